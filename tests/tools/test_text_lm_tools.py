"""The conversion command-line tools on a plain text LM (Qwen2ForCausalLM, tied, QKV bias): the family comes
from config.json; HF -> megatron -> HF gives the original tensors bit for bit (sharded export); bad input
exits 2 naming the problem."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_rcpa.testing.tools import run_tool


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = str(tmp_path_factory.mktemp("text_tools") / "qwen2")
    config = Qwen2Config(vocab_size=301, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=256)
    torch.manual_seed(6)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.05 * torch.randn_like(param))
    model.save_pretrained(path)
    return path


@pytest.mark.megatron
@pytest.mark.multiproc
def test_text_lm_convert_and_export_round_trip(qwen2_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import Qwen2ForCausalLM

    ckpt, back = tmp_path / "megatron", tmp_path / "hf_back"
    rc, out, err = run_tool("convert_hf_to_megatron.py", "--hf-dir", qwen2_dir, "--out", ckpt)
    assert rc == 0, err
    assert "vocab=301 (padded 384)" in out
    meta = json.loads((ckpt / "rcpa_checkpoint.json").read_text())
    assert meta["family"] == "qwen2" and meta["dtype"] == "bf16"

    rc, out, err = run_tool("convert_megatron_to_hf.py", "--megatron-dir", ckpt, "--out", back,
                            "--max-shard-size", "100KB")
    assert rc == 0, err
    assert "model.safetensors.index.json" in os.listdir(back)
    original = load_file(os.path.join(qwen2_dir, "model.safetensors"))
    exported = {}
    for file in os.listdir(back):
        if file.endswith(".safetensors"):
            exported.update(load_file(os.path.join(back, file)))
    assert sorted(exported) == sorted(original) and "lm_head.weight" not in exported
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    reloaded = Qwen2ForCausalLM.from_pretrained(str(back)).state_dict()
    source = Qwen2ForCausalLM.from_pretrained(qwen2_dir).state_dict()
    assert all(torch.equal(source[k], reloaded[k]) for k in source)

    # the parity gate works for text families too (a token batch, no images), here on a TP=2 grid
    rc, out, err = run_tool("verify_conversion.py", "--hf-dir", qwen2_dir, "--megatron-dir", ckpt, "--tp", 2)
    assert rc == 0, out + err
    assert "max |" in out


def test_text_lm_bad_input_exits_2(qwen2_dir, tmp_path):
    rc, _, err = run_tool("convert_hf_to_megatron.py", "--hf-dir", qwen2_dir, "--out", tmp_path / "x", "--tp", 4)
    assert rc == 2 and "TP=4 does not divide num_key_value_heads=2" in err
    assert not os.path.exists(tmp_path / "x")
