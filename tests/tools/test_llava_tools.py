"""The conversion command-line tools on a LLaVA checkpoint (SigLIP tower + Llama, bf16): the family comes from
config.json; HF -> megatron -> HF gives every original tensor back bit for bit (the tower tensors LLaVA does
not read included) and transformers loads the export; the parity gate passes at TP=2 with a LLaVA batch;
bad input exits 2 naming the problem."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_rcpa.testing.tools import run_tool


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    from megatron_rcpa.models.tiny import save_tiny_llava

    return save_tiny_llava(str(tmp_path_factory.mktemp("llava_tools") / "llava"), vision="siglip", text="llama",
                           seed=4, dtype=torch.bfloat16)


@pytest.mark.megatron
@pytest.mark.multiproc
def test_llava_convert_verify_and_export_round_trip(llava_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    ckpt, back = tmp_path / "megatron", tmp_path / "hf_back"
    rc, out, err = run_tool("convert_hf_to_megatron.py", "--hf-dir", llava_dir, "--out", ckpt)
    assert rc == 0, err
    meta = json.loads((ckpt / "rcpa_checkpoint.json").read_text())
    assert meta["family"] == "llava" and meta["dtype"] == "bf16"

    rc, out, err = run_tool("verify_conversion.py", "--hf-dir", llava_dir, "--megatron-dir", ckpt, "--tp", 2)
    assert rc == 0, out + err
    assert "RESULT: PASS" in out and "vision_tower.head.probe" in out

    rc, out, err = run_tool("convert_megatron_to_hf.py", "--megatron-dir", ckpt, "--out", back,
                            "--max-shard-size", "100KB")
    assert rc == 0, err
    original = load_file(os.path.join(llava_dir, "model.safetensors"))
    exported = {}
    for file in os.listdir(back):
        if file.endswith(".safetensors"):
            exported.update(load_file(os.path.join(back, file)))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    assert os.path.exists(back / "preprocessor_config.json")
    reloaded = LlavaForConditionalGeneration.from_pretrained(str(back)).state_dict()
    source = LlavaForConditionalGeneration.from_pretrained(llava_dir).state_dict()
    assert sorted(reloaded) == sorted(source) and all(torch.equal(source[k], reloaded[k]) for k in source)


def test_llava_bad_input_exits_2(llava_dir, tmp_path):
    rc, _, err = run_tool("convert_hf_to_megatron.py", "--hf-dir", llava_dir, "--out", tmp_path / "x", "--tp", 8)
    assert rc == 2 and "TP=8 does not divide" in err
    assert not os.path.exists(tmp_path / "x")
