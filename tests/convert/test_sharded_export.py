"""HF exports are sharded as transformers writes them: ``max_shard_size`` (converter ``--max-shard-size``,
``run.export_max_shard_size``) with ``model.safetensors.index.json`` when there is more than one shard, and one
``model.safetensors`` without an index otherwise; transformers loads both with the original's tensors."""

from __future__ import annotations

import json
import os

import pytest


def _tensor_bytes(path: str) -> dict:
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            out[name] = t.numel() * t.element_size()
    return out


@pytest.mark.multiproc
@pytest.mark.megatron
def test_export_is_sharded_with_a_correct_index_and_loads_in_transformers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_rcpa.convert.hf_to_megatron import convert_hf_to_megatron
    from megatron_rcpa.convert.megatron_to_hf import convert_megatron_to_hf
    from megatron_rcpa.models import families

    hf_dir = families.get("qwen2").save_tiny_hf(str(tmp_path / "hf"), seed=5, dtype=torch.bfloat16)
    ckpt = str(tmp_path / "megatron")
    convert_hf_to_megatron(hf_dir, ckpt, timeout=300)

    sharded, single = str(tmp_path / "sharded"), str(tmp_path / "single")
    files = convert_megatron_to_hf(ckpt, sharded, max_shard_size="50KB", timeout=300)
    assert len(files) > 2 and files == [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
                                        for i in range(len(files))]
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert sorted(set(index["weight_map"].values())) == files
    total = 0
    for file in files:
        sizes = _tensor_bytes(os.path.join(sharded, file))
        assert {n for n, f in index["weight_map"].items() if f == file} == set(sizes)
        assert sum(sizes.values()) <= 50_000 or len(sizes) == 1, (file, sizes)  # only a lone tensor may exceed it
        total += sum(sizes.values())
    assert index["metadata"]["total_size"] == total
    assert not os.path.exists(os.path.join(sharded, "model.safetensors"))

    assert convert_megatron_to_hf(ckpt, single, timeout=300) == ["model.safetensors"]  # default 5GB: one file
    assert not os.path.exists(os.path.join(single, "model.safetensors.index.json"))

    original = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).state_dict()
    for directory in (sharded, single):
        loaded = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).state_dict()
        assert sorted(loaded) == sorted(original)
        for name, tensor in original.items():
            assert loaded[name].dtype == torch.bfloat16 and torch.equal(loaded[name], tensor), name


def test_max_shard_size_is_checked():
    from megatron_rcpa.convert.errors import ConversionError
    from megatron_rcpa.convert.megatron_to_hf import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("50KB") == 50_000 and parse_size(1234) == 1234
    with pytest.raises(ConversionError, match="cannot parse size 'big'"):
        parse_size("big")


def test_streamed_reads_and_writes_are_exact(tmp_path):
    """The reader's plain reads equal safetensors' own; the part writer's files load in safetensors with the
    same tensors (bf16, fp32, a 0-dim and an empty tensor), in several parts with a correct index."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from megatron_rcpa.convert.hf_io import HFCheckpointReader
    from megatron_rcpa.convert.megatron_to_hf import _PartWriter

    torch.manual_seed(0)
    tensors = {"a.weight": torch.randn(7, 5).to(torch.bfloat16), "b.bias": torch.randn(3),
               "c.scalar": torch.tensor(2.5), "d.empty": torch.zeros(0, 4), "e.ids": torch.arange(6)}
    src = tmp_path / "src"
    src.mkdir()
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text("{}")
    reader = HFCheckpointReader(str(src))
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        for name in tensors:
            got = reader.get(name)
            assert got.dtype == f.get_tensor(name).dtype and torch.equal(got, f.get_tensor(name)), name
    reader.close()

    writer = _PartWriter(str(tmp_path), "part.safetensors")
    for name, t in tensors.items():
        writer.add(name, t)
    info = writer.close()
    assert info["names"] == sorted(tensors) and info["bytes"] == sum(t.numel() * t.element_size()
                                                                      for t in tensors.values())
    assert not os.path.exists(tmp_path / "part.safetensors.data")
    loaded = load_file(str(tmp_path / "part.safetensors"))
    assert sorted(loaded) == sorted(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    with safe_open(str(tmp_path / "part.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
