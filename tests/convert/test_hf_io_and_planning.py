"""Reading HF checkpoints (single / sharded / in-memory names) and the pre-conversion checks: every bad input
gives a ConversionError naming the file / tensor / key / value. No megatron process is started here."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_rcpa.convert.checkpoint import CheckpointMetadata, read_metadata
from megatron_rcpa.convert.errors import ConversionError
from megatron_rcpa.convert.hf_io import HFCheckpointReader, copy_assets, list_assets
from megatron_rcpa.convert.hf_to_megatron import plan_hf_to_megatron
from megatron_rcpa.convert.megatron_to_hf import parse_size
from megatron_rcpa.models.decoder import DecoderDims

ALIASES = (("model.language_model.", "model."), ("model.visual.", "visual."))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from megatron_rcpa.models.tiny import save_tiny_qwen2_5_vl

    return save_tiny_qwen2_5_vl(str(tmp_path_factory.mktemp("hfio") / "tiny"))


@pytest.fixture
def variant(tiny_dir, tmp_path):
    """A fresh copy of the tiny checkpoint to break."""
    path = str(tmp_path / "variant")
    shutil.copytree(tiny_dir, path)
    return path


def _tensors(path):
    return load_file(os.path.join(path, "model.safetensors"))


def _write(path, tensors):
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def _edit_config(path, **changes):
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    for key, value in changes.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def test_plan_of_a_good_checkpoint(tiny_dir):
    plan = plan_hf_to_megatron(tiny_dir, tp=2, pp=2)
    assert (plan.family, plan.dtype, plan.source_dtype) == ("qwen2_5_vl", "fp32", "fp32")
    assert (plan.vocab_size, plan.padded_vocab_size) == (301, 384)
    assert plan_hf_to_megatron(tiny_dir, dtype="bf16", make_vocab_size_divisible_by=64).padded_vocab_size == 320
    assert plan_hf_to_megatron(tiny_dir, dtype="bf16").dtype == "bf16"


def test_mixed_dtypes_are_recorded_for_the_export(variant):
    tensors = {k: v.to(torch.bfloat16) for k, v in _tensors(variant).items()}
    tensors["model.norm.weight"] = tensors["model.norm.weight"].float()
    _write(variant, tensors)
    plan = plan_hf_to_megatron(variant)
    assert (plan.source_dtype, plan.dtype, plan.hf_tensor_dtypes) == ("bf16", "bf16", {"model.norm.weight": "fp32"})
    assert plan.metadata().hf_tensor_dtypes == {"model.norm.weight": "fp32"}


def test_reader_sharded_index_and_in_memory_names(tiny_dir, tmp_path):
    on_disk = _tensors(tiny_dir)
    # transformers-5 in-memory names, in two files with an index
    renamed = {("model.language_model." + k[len("model."):]) if k.startswith("model.") else
               ("model." + k if k.startswith("visual.") else k): v for k, v in on_disk.items()}
    names = sorted(renamed)
    half = len(names) // 2
    shards = [{n: renamed[n] for n in names[:half]}, {n: renamed[n] for n in names[half:]}]
    path = tmp_path / "inmem"
    path.mkdir()
    shutil.copy(os.path.join(tiny_dir, "config.json"), path)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(shard, str(path / file))
        weight_map.update({n: file for n in shard})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    reader = HFCheckpointReader(str(path), ALIASES)
    assert reader.names() == sorted(on_disk)
    assert torch.equal(reader.get("visual.merger.mlp.0.weight"), on_disk["visual.merger.mlp.0.weight"])
    assert reader.shape("model.embed_tokens.weight") == (301, 64)
    plan_hf_to_megatron(str(path))  # the in-memory-named, sharded checkpoint passes every check
    # the same tensor under both names is refused
    save_file({"model.embed_tokens.weight": on_disk["model.embed_tokens.weight"]}, str(path / "extra.safetensors"))
    weight_map["model.embed_tokens.weight"] = "extra.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ConversionError, match="'model.embed_tokens.weight' appears twice"):
        HFCheckpointReader(str(path), ALIASES)


def test_unknown_architecture(variant):
    _edit_config(variant, architectures=["FooForCausalLM"], model_type="foo")
    with pytest.raises(ConversionError, match="unknown architecture \\['FooForCausalLM'\\]"):
        plan_hf_to_megatron(variant)


def test_missing_unexpected_and_misshaped_tensors(variant):
    tensors = _tensors(variant)
    name = "model.layers.1.self_attn.k_proj.bias"
    _write(variant, {k: v for k, v in tensors.items() if k != name})
    with pytest.raises(ConversionError, match=f"missing tensor\\(s\\) in .*'{name}'"):
        plan_hf_to_megatron(variant)
    _write(variant, dict(tensors, **{"model.layers.0.self_attn.rope.weight": torch.zeros(2)}))
    with pytest.raises(ConversionError, match="unexpected tensor\\(s\\) .*'model.layers.0.self_attn.rope.weight'"):
        plan_hf_to_megatron(variant)
    _write(variant, dict(tensors, **{"model.layers.0.mlp.up_proj.weight": torch.zeros(127, 64)}))
    with pytest.raises(ConversionError, match="'model.layers.0.mlp.up_proj.weight' .* shape \\[127, 64\\].*"
                                              "implies \\[128, 64\\]"):
        plan_hf_to_megatron(variant)
    # non-persistent rotary buffers some exporters write are ignored
    _write(variant, dict(tensors, **{"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)}))
    plan_hf_to_megatron(variant)


def test_tied_checkpoint_may_carry_its_lm_head(tmp_path):
    from megatron_rcpa.models.tiny import save_tiny_qwen2_5_vl

    path = save_tiny_qwen2_5_vl(str(tmp_path / "tied"), tie_word_embeddings=True, with_assets=False)
    tensors = _tensors(path)
    assert "lm_head.weight" not in tensors
    _write(path, dict(tensors, **{"lm_head.weight": tensors["model.embed_tokens.weight"].clone()}))
    plan_hf_to_megatron(path)


@pytest.mark.parametrize("tp,pp,message", [
    (3, 1, "TP=3 does not divide num_attention_heads=4"),
    (4, 1, "TP=4 does not divide num_key_value_heads=2"),
    (1, 3, "PP=3 does not divide num_hidden_layers=2"),
])
def test_parallel_layout_that_does_not_divide(tiny_dir, tp, pp, message):
    with pytest.raises(ConversionError, match=message):
        plan_hf_to_megatron(tiny_dir, tp=tp, pp=pp)


def test_one_kv_head_cannot_split_over_tp(variant):
    _edit_config(variant, **{"text_config.num_key_value_heads": 1})
    with pytest.raises(ConversionError, match="TP=2 does not divide num_key_value_heads=1"):
        plan_hf_to_megatron(variant, tp=2)


def test_unreadable_files(variant, tmp_path):
    with open(os.path.join(variant, "model.safetensors"), "wb") as f:
        f.write(b"\x00garbage" * 10)
    with pytest.raises(ConversionError, match="cannot read safetensors file .*model.safetensors"):
        plan_hf_to_megatron(variant)
    os.remove(os.path.join(variant, "model.safetensors"))
    open(os.path.join(variant, "pytorch_model.bin"), "wb").close()
    with pytest.raises(ConversionError, match="no \\*.safetensors files .*pytorch_model.bin"):
        plan_hf_to_megatron(variant)
    with open(os.path.join(variant, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}, f)
    with pytest.raises(ConversionError, match="lists 'model-00001-of-00002.safetensors', which does not exist"):
        plan_hf_to_megatron(variant)
    os.remove(os.path.join(variant, "config.json"))
    with pytest.raises(ConversionError, match="config.json not found"):
        plan_hf_to_megatron(variant)
    with pytest.raises(ConversionError, match="does not exist"):
        plan_hf_to_megatron(str(tmp_path / "nowhere"))
    with open(os.path.join(variant, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ConversionError, match="cannot read .*config.json"):
        plan_hf_to_megatron(variant)


def test_unsupported_text_config_values():
    base = dict(num_attention_heads=4, hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=10)
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        DecoderDims.from_hf_text_config(dict(base, rope_parameters={"rope_type": "yarn"}), qkv_bias=True,
                                        tie_word_embeddings=False)
    with pytest.raises(ValueError, match="use_sliding_window=True"):
        DecoderDims.from_hf_text_config(dict(base, use_sliding_window=True), qkv_bias=True, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        DecoderDims.from_hf_text_config(dict(base, hidden_act="gelu"), qkv_bias=True, tie_word_embeddings=False)


def test_checkpoint_metadata_and_invalid_directories(tmp_path):
    meta = CheckpointMetadata(family="qwen2_5_vl", hf_config={"model_type": "qwen2_5_vl"}, dtype="bf16",
                              vocab_size=301, padded_vocab_size=384, source_dtype="fp32")
    assert CheckpointMetadata.from_dict(json.loads(meta.to_json())) == meta
    with pytest.raises(ConversionError, match="missing key\\(s\\) \\['padded_vocab_size'\\]"):
        CheckpointMetadata.from_dict({k: v for k, v in json.loads(meta.to_json()).items() if k != "padded_vocab_size"})
    with pytest.raises(ConversionError, match="format_version=99"):
        CheckpointMetadata.from_dict(dict(json.loads(meta.to_json()), format_version=99))
    with pytest.raises(ConversionError, match="does not exist"):
        read_metadata(str(tmp_path / "nothing"))
    half = tmp_path / "ckpt.incomplete"
    (half / "model").mkdir(parents=True)
    with pytest.raises(ConversionError, match="rcpa_checkpoint.json not found \\(an interrupted save\\?\\)"):
        read_metadata(str(half))
    (half / "rcpa_checkpoint.json").write_text(meta.to_json())
    assert read_metadata(str(half)) == meta


def test_assets_are_listed_and_copied(tiny_dir, tmp_path):
    assets = list_assets(tiny_dir)
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja",
            "generation_config.json"} <= set(assets)
    assert "config.json" not in assets and "model.safetensors" not in assets
    copied = copy_assets(tiny_dir, str(tmp_path / "assets"))
    assert copied == assets
    for name in assets:
        with open(os.path.join(tiny_dir, name), "rb") as a, open(tmp_path / "assets" / name, "rb") as b:
            assert a.read() == b.read()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("200KB") == 200_000 and parse_size(123) == 123
    with pytest.raises(ConversionError, match="cannot parse size"):
        parse_size("lots")


def test_patchify_matches_the_hf_image_processor():
    pytest.importorskip("PIL")
    from transformers import Qwen2VLImageProcessor

    from megatron_rcpa.convert.verify import _synthetic_image, patchify_image

    processor = Qwen2VLImageProcessor()
    for height, width in [(56, 84), (112, 56)]:
        image = _synthetic_image(height, width, 1)
        ref = processor(images=[image], return_tensors="pt")
        ours, grid = patchify_image(image, patch_size=14, merge_size=2, temporal_patch_size=2)
        assert ref["image_grid_thw"].tolist() == [grid]
        torch.testing.assert_close(ours, ref["pixel_values"], rtol=0, atol=2e-6)
