"""What only the Qwen2.5-VL policy has (the checks every family shares are in test_policy_families.py, on the
same spawns): the replicated HF vision tower's gradients averaged over TP and equal to transformers', logits
gathered over TP and ``loss_fn`` == ``labels``, checkpoint guards (an interrupted save, a wrong padded
vocabulary), a conversion run on a TP=2 grid (loaded at PP=2 by the shared test), the export tool at PP=2."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.megatron, pytest.mark.multiproc]

CASE = "qwen2_5_vl"


def test_tp1_checkpoint_guards(harness):
    res = harness.tp1(CASE)["untied"]
    atomic = res["atomic"]
    assert atomic["raised"] and not atomic["exists"] and not atomic["is_checkpoint"]
    assert "rcpa_checkpoint.json not found" in atomic["incomplete_refused"]
    assert "padded vocabulary of 384" in res["vocab_mismatch"] and "512" in res["vocab_mismatch"]


def test_tp2_gathered_logits_loss_fn_and_vision_grads(harness):
    ranks = harness.tp2(CASE)
    ref = harness.reference(CASE)["untied"]
    for r in ranks:
        res = r["untied"]
        assert res["gathered_width"] == 384 and res["gathered_equal"] and res["loss_fn_equal"]
        assert res["grad_loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert res["tagged"]
    # vision grads: identical on both TP ranks after the average, and equal to HF's
    g0, g1 = ranks[0]["untied"]["vision_grads"], ranks[1]["untied"]["vision_grads"]
    assert set(g0) == set(ref["vision_grads"])
    for name, grad in g0.items():
        assert torch.equal(grad, g1[name]), name
        torch.testing.assert_close(grad, ref["vision_grads"][name], rtol=1e-4, atol=1e-6, msg=name)
    assert "untied_converted_at_tp2" in harness.pp2_ckpts(CASE)  # loaded at PP=2 by the shared test


def test_export_tool_on_a_pp2_grid(harness, tmp_path):
    """convert_megatron_to_hf on two pipeline stages: each stage writes its files, named and indexed after."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_rcpa.convert.megatron_to_hf import convert_megatron_to_hf

    out = tmp_path / "exported"
    files = convert_megatron_to_hf(harness.tp1(CASE)["untied"]["ckpt"], str(out), pp=2, max_shard_size="1MB",
                                   timeout=300)
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["visual.patch_embed.proj.weight"] == files[0]
    assert index["weight_map"]["lm_head.weight"] == files[1]
    original = Qwen2_5_VLForConditionalGeneration.from_pretrained(harness.models(CASE)["untied"]).state_dict()
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out)).state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
