"""Every policy family on megatron-core vs transformers, the same checks for each (``family_harness.CASES``):
HF -> megatron -> HF bit-identity (tied heads left out), logits parity at TP=1 / TP=2 / PP=2 (fp32, 1e-4) with
the family's batch, padded vocabulary (301 -> 384) that never wins a softmax, left padding, per-token loss,
the trainer's forward, KV-cache decoding (also through the PP schedule) == argmax of full HF forwards.

Family-specific checks are in test_qwen2_5_vl_policy.py, test_llava.py and test_text_lm.py (same spawns).
"""

from __future__ import annotations

import os

import pytest
import torch
from family_harness import ATOL, CASES, check_decode

pytestmark = [pytest.mark.megatron, pytest.mark.multiproc]

FAMILIES = sorted(CASES)


@pytest.mark.parametrize("case", FAMILIES)
def test_tp1_round_trip_logits_loss_padding_and_decode(harness, case):
    tp1, reference, batches = harness.tp1(case), harness.reference(case), harness.batches(case)
    hf = harness.hf_models(case)
    assert sorted(n for n in tp1 if tp1[n]["tied"]) == sorted(CASES[case].tied)  # both kinds are covered
    for name, res in tp1.items():
        ref, batch = reference[name], batches[name]
        assert (res["vocab"], res["padded_vocab"]) == (301, 384), name
        # HF -> megatron -> HF: every tensor back, bit for bit and dtype (no output head for a tied model)
        expected = [n for n in res["hf_names"] if not (res["tied"] and n == res["tied_head"])]
        assert res["exported"] == expected and res["not_identical"] == [], name
        assert (res["tied_head"] in res["exported"]) == (not res["tied"]), name
        diff = (res["logits"] - ref["logits"]).abs().max().item()
        assert diff <= ATOL, f"{name}: max |dlogit| {diff}"
        assert torch.all(res["pad_logits"] == -1.0e4), name  # padded vocabulary never wins a softmax
        mask = batch["attention_mask"].bool()
        assert (res["masked_logits"] - ref["masked_logits"])[mask].abs().max().item() <= ATOL, name  # pads: garbage
        assert res["loss"] == pytest.approx(ref["loss"], rel=1e-5), name
        assert res["trainer_forward_equal"], name
        tokens, logits = res["decode"]
        assert tokens.shape == (3, CASES[case].n_new)
        check_decode(tokens, logits, hf[name], batch)
        check_decode(*res["masked_decode"], hf[name], batch, attention_mask=batch["attention_mask"])
        # the first decoded token's logits are the prompt's last-position logits
        assert (logits[:, 0] - ref["logits"][:, -1]).abs().max().item() <= ATOL, name


@pytest.mark.parametrize("case", FAMILIES)
def test_tp2_logits_loss_and_decode(harness, case):
    ranks, tp1, reference = harness.tp2(case), harness.tp1(case), harness.reference(case)
    assert [r["tp_rank"] for r in ranks] == [0, 1]
    for name in CASES[case].tp2_models:
        ref = reference[name]
        for r in ranks:
            res = r[name]
            assert res["local_vocab"] == 384 // 2
            assert (res["logits"] - ref["logits"]).abs().max().item() <= ATOL, name
            assert res["loss"] == pytest.approx(ref["loss"], rel=1e-5), name
        tokens, logits = ranks[0][name]["decode"]
        assert torch.equal(tokens, ranks[1][name]["decode"][0])
        assert torch.equal(tokens, tp1[name]["decode"][0])
        check_decode(tokens, logits, harness.hf_models(case)[name], harness.batches(case)[name])


@pytest.mark.parametrize("case", FAMILIES)
def test_pp2_logits_export_and_pipelined_decode(harness, case):
    from safetensors.torch import load_file

    first, last = harness.pp2(case)
    tp1, reference, models = harness.tp1(case), harness.reference(case), harness.models(case)
    for name, (_, model) in harness.pp2_ckpts(case).items():
        assert first[name]["has_vision"] == CASES[case].vlm and not last[name]["has_vision"]
        assert first[name]["num_layers_here"] == last[name]["num_layers_here"] == 1
        assert first[name]["logits"] is None
        diff = (last[name]["logits"] - reference[model]["logits"]).abs().max().item()
        assert diff <= ATOL, f"{name}: max |dlogit| {diff}"
        # the two stages export disjoint HF tensors that together are the original files, bit for bit
        both = {**first[name]["exported"], **last[name]["exported"]}
        assert len(both) == len(first[name]["exported"]) + len(last[name]["exported"])
        original = load_file(os.path.join(models[model], "model.safetensors"))
        assert sorted(both) == sorted(original)
        assert all(torch.equal(both[n], original[n]) for n in original)
        tokens, logits = last[name]["decode"]
        assert torch.equal(tokens, first[name]["decode"][0])
        assert torch.equal(tokens, tp1[model]["decode"][0])
        check_decode(tokens, logits, harness.hf_models(case)[model], harness.batches(case)[model])
