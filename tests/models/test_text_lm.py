"""What only the plain text LMs (LlamaForCausalLM, Qwen2ForCausalLM) have (the checks every family shares are in
test_policy_families.py, on the same spawns): no image inputs, RoPE positions that follow the sequence,
Qwen2's QKV bias through the round trip, and the planning errors.
"""

from __future__ import annotations

import os

import pytest

CASE = "text_lm"


def save_tiny_text_lm(path, kind, *, seed=0, tied=False, num_key_value_heads=2, **overrides):
    """A random tiny Llama / Qwen2 causal LM saved with save_pretrained (norms and biases made non-trivial)."""
    from megatron_rcpa.models.tiny import save_tiny_text_lm as save

    return save(path, kind, seed=seed, tie_word_embeddings=tied, num_key_value_heads=num_key_value_heads,
                **overrides)


@pytest.fixture(scope="module")
def text_models(harness):
    return harness.models(CASE)


def test_planning_errors_name_the_problem(text_models, tmp_path):
    import json

    from megatron_rcpa.convert.errors import ConversionError
    from megatron_rcpa.convert.hf_to_megatron import plan_hf_to_megatron

    with pytest.raises(ConversionError, match="TP=4 does not divide num_key_value_heads=2"):
        plan_hf_to_megatron(text_models["llama"], tp=4)
    with pytest.raises(ConversionError, match="TP=2 does not divide num_key_value_heads=1"):
        plan_hf_to_megatron(text_models["qwen2"], tp=2)
    biased = save_tiny_text_lm(str(tmp_path / "biased"), "llama", attention_bias=True)
    with pytest.raises(ConversionError, match="attention_bias=True"):
        plan_hf_to_megatron(biased)
    # a tensor gone from the file
    from safetensors.torch import load_file, save_file

    broken = save_tiny_text_lm(str(tmp_path / "broken"), "llama")
    tensors = load_file(os.path.join(broken, "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"missing tensor\(s\).*model.layers.1.mlp.up_proj.weight"):
        plan_hf_to_megatron(broken)
    config = json.loads(open(os.path.join(broken, "config.json")).read())
    config["architectures"] = ["MistralForCausalLM"]
    with open(os.path.join(broken, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ConversionError, match="unknown architecture.*LlamaForCausalLM"):
        plan_hf_to_megatron(broken)


@pytest.mark.megatron
@pytest.mark.multiproc
def test_tp1_text_inputs_only_and_qkv_bias(harness):
    tp1 = harness.tp1(CASE)
    for name in ("llama", "qwen2"):
        res = tp1[name]
        assert res["family"] == name
        assert ("model.layers.0.self_attn.q_proj.bias" in res["exported"]) == (name == "qwen2")
        assert "pixel_values" in res["errors"]["pixels"] and "position_ids" in res["errors"]["positions"]
