"""The three command-line tools end to end, as a user runs them:

bf16 HF checkpoint (sharded, transformers-5 in-memory names) -> convert_hf_to_megatron (fp32) ->
verify_conversion at TP=2 (spawns its workers) -> convert_megatron_to_hf (sharded) -> from_pretrained gives
the original tensors bit for bit, with the tokenizer/processor files; plus the failure modes.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_rcpa.testing.tools import run_tool

FP32_TENSOR = "visual.merger.ln_q.weight"


def read_safetensors_dir(path):
    """on-disk name -> tensor over every safetensors file of a directory (in-memory names mapped back)."""
    from safetensors.torch import load_file

    out = {}
    for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
            for name, tensor in load_file(os.path.join(path, file)).items():
                if name.startswith("model.language_model."):
                    name = "model." + name[len("model.language_model."):]
                elif name.startswith("model.visual."):
                    name = name[len("model."):]
                out[name] = tensor
    return out




@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """bf16 tiny Qwen2.5-VL (one tensor kept in fp32) saved in two safetensors files under transformers-5
    in-memory names."""
    from safetensors.torch import load_file, save_file

    from megatron_rcpa.models.tiny import save_tiny_qwen2_5_vl

    path = save_tiny_qwen2_5_vl(str(tmp_path_factory.mktemp("tools") / "hf"), seed=4, dtype=torch.bfloat16)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(path, "model.safetensors"))
    tensors[FP32_TENSOR] = tensors[FP32_TENSOR].float() + 1e-4  # not representable in bf16

    def in_memory(name):
        if name.startswith("model."):
            return "model.language_model." + name[len("model."):]
        return "model." + name if name.startswith("visual.") else name

    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({in_memory(n): tensors[n] for n in part}, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({in_memory(n): file for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


@pytest.mark.megatron
@pytest.mark.multiproc
def test_convert_verify_export_round_trip(hf_dir, tmp_path):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    ckpt, back = tmp_path / "megatron", tmp_path / "hf_back"
    rc, out, err = run_tool("convert_hf_to_megatron.py", "--hf-dir", hf_dir, "--out", ckpt, "--dtype", "fp32")
    assert rc == 0, err
    assert "dtype=fp32 vocab=301 (padded 384)" in out
    assert sorted(os.listdir(ckpt)) == ["hf_assets", "model", "rcpa_checkpoint.json", "rcpa_manifest.json"]
    assert not os.path.exists(f"{ckpt}.incomplete")

    rc, out, err = run_tool("verify_conversion.py", "--hf-dir", hf_dir, "--megatron-dir", ckpt, "--tp", 2,
                            "--atol", 1e-4)
    assert rc == 0, out + err
    assert "TP=2 PP=1" in out and "RESULT: PASS" in out and "tensors exact     = 57/57" in out
    assert "model.layers.1.self_attn.q_proj.weight" in out  # the per-tensor table
    max_delta = float(out.split("max |delta logit| = ")[1].split()[0])
    assert max_delta <= 1e-4

    rc, out, err = run_tool("convert_megatron_to_hf.py", "--megatron-dir", ckpt, "--out", back,
                            "--max-shard-size", "150KB")
    assert rc == 0, err
    files = sorted(os.listdir(back))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    for asset in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja",
                  "generation_config.json"):
        with open(os.path.join(hf_dir, asset), "rb") as a, open(back / asset, "rb") as b:
            assert a.read() == b.read(), asset
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    original_files, exported_files = read_safetensors_dir(hf_dir), read_safetensors_dir(back)
    assert sorted(original_files) == sorted(exported_files)
    for name, tensor in original_files.items():  # same dtype (bf16, and fp32 for the one) and bits
        assert exported_files[name].dtype == tensor.dtype and torch.equal(exported_files[name], tensor), name
    assert exported_files[FP32_TENSOR].dtype == torch.float32
    original = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir).state_dict()
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(back)).state_dict()
    assert original.keys() == reloaded.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, reloaded[name]), name
    assert AutoTokenizer.from_pretrained(str(back)).convert_tokens_to_ids("<|image_pad|>") == 299

    # the gate fails (exit 1) against a different model of the same shape
    from megatron_rcpa.models.tiny import save_tiny_qwen2_5_vl

    other = save_tiny_qwen2_5_vl(str(tmp_path / "other"), seed=5, dtype=torch.bfloat16)
    rc, out, err = run_tool("verify_conversion.py", "--hf-dir", other, "--megatron-dir", ckpt)
    assert rc == 1, out + err
    assert "RESULT: FAIL" in out and "differs" in out

    # existing outputs are refused, naming them
    rc, _, err = run_tool("convert_megatron_to_hf.py", "--megatron-dir", ckpt, "--out", back)
    assert rc == 2 and "already exists" in err


def test_bad_input_exits_2_naming_the_problem_and_writes_nothing(hf_dir, tmp_path):
    out = tmp_path / "never"
    rc, _, err = run_tool("convert_hf_to_megatron.py", "--hf-dir", hf_dir, "--out", out, "--tp", 4)
    assert rc == 2 and "TP=4 does not divide num_key_value_heads=2" in err
    rc, _, err = run_tool("convert_hf_to_megatron.py", "--hf-dir", tmp_path / "missing", "--out", out)
    assert rc == 2 and "does not exist" in err
    rc, _, err = run_tool("convert_megatron_to_hf.py", "--megatron-dir", hf_dir, "--out", out)
    assert rc == 2 and "not a megatron_rcpa checkpoint: rcpa_checkpoint.json not found" in err
    assert not os.path.exists(out) and not os.path.exists(f"{out}.incomplete")
