"""Qwen2.5-VL policy on megatron-core vs transformers: logits parity at TP=1 / TP=2 / PP=2 with a real image
batch, KV-cache decoding vs full forwards, vision gradients averaged over TP, HF -> megatron -> HF bit-identity,
GQA with one KV head, tied and untied embeddings, a vocabulary padded for TP (301 -> 384).

Three spawns in all (TP1, TP2, PP2); each worker does several checks and ships tensors back for the asserts.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytestmark = [pytest.mark.megatron, pytest.mark.multiproc]

ATOL = 1e-4
N_NEW = 4  # tokens decoded with the KV cache


# ------------------------------------------------------------------------------------- worker helpers
def _prompt(batch):
    return {k: batch[k] for k in ("input_ids", "pixel_values", "image_grid_thw")}


def _decode(policy, batch, attention_mask=None):
    from megatron_rcpa.models.inference import greedy_generate

    return greedy_generate(policy, batch["input_ids"], max_new_tokens=N_NEW, pixel_values=batch["pixel_values"],
                           image_grid_thw=batch["image_grid_thw"], attention_mask=attention_mask,
                           return_logits=True)


def _failed_save_leaves_no_checkpoint(policy, meta, out_root):
    """A save that dies half-way leaves only '<dir>.incomplete', which read_metadata refuses."""
    from megatron.core import dist_checkpointing

    from megatron_rcpa.convert.checkpoint import is_checkpoint, read_metadata, save_checkpoint
    from megatron_rcpa.convert.errors import ConversionError

    target = os.path.join(out_root, "broken")
    original = dist_checkpointing.save

    def dying_save(*args, **kwargs):
        raise RuntimeError("disk full")

    dist_checkpointing.save = dying_save
    try:
        save_checkpoint(policy, target, meta)
        raised = False
    except RuntimeError:
        raised = True
    finally:
        dist_checkpointing.save = original
    try:
        read_metadata(target + ".incomplete")
        refused = ""
    except ConversionError as exc:
        refused = str(exc)
    return {"raised": raised, "exists": os.path.exists(target), "is_checkpoint": is_checkpoint(target),
            "incomplete_refused": refused}


def tp1_worker(models, out_root, batch):
    from megatron_rcpa.convert.checkpoint import build_policy_from_checkpoint, load_checkpoint
    from megatron_rcpa.convert.errors import ConversionError
    from megatron_rcpa.convert.families import family_by_name
    from megatron_rcpa.convert.hf_io import HFCheckpointReader
    from megatron_rcpa.convert.hf_to_megatron import convert_rank, plan_hf_to_megatron
    from megatron_rcpa.convert.megatron_to_hf import export_hf_tensors
    from megatron_rcpa.models.policy_base import trainer_forward

    results = {}
    for name, hf_dir in models.items():
        ckpt = os.path.join(out_root, name)
        convert_rank(plan_hf_to_megatron(hf_dir), ckpt)
        policy, meta = build_policy_from_checkpoint(ckpt)
        policy.eval()
        family = family_by_name(meta.family)
        with torch.no_grad():
            logits = policy(**_prompt(batch))
        reader = HFCheckpointReader(hf_dir, family.hf_aliases)
        exported = dict(export_hf_tensors(policy, family, meta.hf_config))
        not_identical = [n for n, t in exported.items()
                         if n not in reader or t.dtype != reader.get(n).dtype or not torch.equal(t, reader.get(n))]
        res = {"ckpt": ckpt, "vocab": meta.vocab_size, "padded_vocab": meta.padded_vocab_size,
               "logits": logits[..., : meta.vocab_size], "pad_logits": logits[..., meta.vocab_size:],
               "exported": sorted(exported), "hf_names": reader.names(), "not_identical": not_identical}
        if name == "untied":
            res["decode"] = _decode(policy, batch)
            res["masked_decode"] = _decode(policy, batch, attention_mask=batch["attention_mask"])
            with torch.no_grad():
                res["masked_logits"] = policy(**_prompt(batch), attention_mask=batch["attention_mask"])[..., :301]
                mb = {"tokens": batch["input_ids"], "pixel_values": batch["pixel_values"],
                      "image_grid_thw": batch["image_grid_thw"]}
                res["trainer_forward_equal"] = torch.equal(trainer_forward(policy, mb), logits)
                res["loss"] = float(policy(**_prompt(batch), labels=batch["labels"]).sum())
            res["atomic"] = _failed_save_leaves_no_checkpoint(policy, meta, out_root)
            wrong = family.build_policy(meta.hf_config, padded_vocab_size=512, perform_initialization=False)
            try:
                load_checkpoint(wrong, ckpt)
                res["vocab_mismatch"] = ""
            except ConversionError as exc:
                res["vocab_mismatch"] = str(exc)
        results[name] = res
    return results


def tp2_worker(ckpt, hf_dir, out_root, batch):
    from megatron.core import parallel_state, tensor_parallel

    from megatron_rcpa.convert.checkpoint import build_policy_from_checkpoint
    from megatron_rcpa.convert.hf_to_megatron import convert_rank, plan_hf_to_megatron
    from megatron_rcpa.models.inference import gather_vocab_logits
    from megatron_rcpa.models.qwen2_5_vl import allreduce_vision_grads

    converted_here = os.path.join(out_root, "untied_converted_at_tp2")  # conversion on a TP=2 grid
    convert_rank(plan_hf_to_megatron(hf_dir, tp=2), converted_here)

    policy, meta = build_policy_from_checkpoint(ckpt)
    policy.eval()
    with torch.no_grad():
        local = policy(**_prompt(batch))
        logits = gather_vocab_logits(local, meta.vocab_size)
        gathered = policy(**_prompt(batch), runtime_gather_output=True)
        def per_token_ce(vocab_parallel_logits):
            return tensor_parallel.vocab_parallel_cross_entropy(vocab_parallel_logits.float(), batch["labels"])

        via_loss_fn = policy(**_prompt(batch), loss_fn=per_token_ce)
        via_labels = policy(**_prompt(batch), labels=batch["labels"])
    out = {"tp_rank": parallel_state.get_tensor_model_parallel_rank(), "local_vocab": local.shape[-1],
           "logits": logits, "gathered_equal": torch.equal(gathered[..., : meta.vocab_size], logits),
           "gathered_width": gathered.shape[-1], "loss_fn_equal": torch.equal(via_loss_fn, via_labels),
           "converted_here": converted_here}
    policy.train()
    loss = policy(**_prompt(batch), labels=batch["labels"]).sum()
    loss.backward()
    allreduce_vision_grads(policy)
    out["loss"] = float(loss)
    out["vision_grads"] = {n: p.grad.clone() for n, p in policy.vision_model.named_parameters()}
    out["tagged"] = all(getattr(p, "average_gradients_across_tp_domain", False)
                        for p in policy.vision_model.parameters())
    policy.zero_grad(set_to_none=True)
    policy.eval()
    out["decode"] = _decode(policy, batch)
    return out


def pp2_worker(ckpts, batch):
    from megatron_rcpa.convert.checkpoint import build_policy_from_checkpoint
    from megatron_rcpa.convert.families import family_by_name
    from megatron_rcpa.convert.megatron_to_hf import export_hf_tensors
    from megatron_rcpa.models.inference import pipeline_greedy_generate
    from megatron_rcpa.models.pipeline import pipeline_forward

    ids = batch["input_ids"]
    out = {}
    for name, ckpt in ckpts.items():
        policy, meta = build_policy_from_checkpoint(ckpt)
        policy.eval()
        outputs = pipeline_forward(policy, [_prompt(batch)], seq_length=ids.shape[1], micro_batch_size=ids.shape[0])
        out[name] = {"logits": outputs[0][..., : meta.vocab_size] if outputs is not None else None,
                     "has_vision": policy.vision_model is not None,
                     "num_layers_here": len(policy.language_model.decoder.layers)}
        if name == "untied":
            out[name]["decode"] = pipeline_greedy_generate(policy, **_prompt(batch), max_new_tokens=N_NEW,
                                                           return_logits=True)
        family = family_by_name(meta.family)
        out[name]["exported"] = dict(export_hf_tensors(policy, family, meta.hf_config))  # this stage's tensors
    return out


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tp1(tiny_models, vl_batch, tmp_path_factory):
    from megatron_rcpa.testing.launcher import run_distributed

    out_root = str(tmp_path_factory.mktemp("megatron_ckpts"))
    return run_distributed(tp1_worker, world_size=1, args=(tiny_models, out_root, vl_batch), timeout=300)[0]


@pytest.fixture(scope="module")
def tp2(tp1, tiny_models, vl_batch):
    """The TP=2 spawn: checks on the TP1-converted checkpoint, and a conversion run on the TP=2 grid."""
    from megatron_rcpa.testing.launcher import run_distributed

    out_root = os.path.dirname(tp1["untied"]["ckpt"])
    return run_distributed(tp2_worker, world_size=2, tp=2,
                           args=(tp1["untied"]["ckpt"], tiny_models["untied"], out_root, vl_batch), timeout=300)


def _check_decode(tokens, logits, hf_model, batch, hf_forward, attention_mask=None):
    """Cached greedy decoding == argmax of full HF forwards over prompt + generated tokens (3-D positions of
    the new tokens continue from the prompt's largest position + 1, as transformers' rope_deltas do)."""
    prompt = batch["input_ids"]
    full = torch.cat([prompt, tokens], dim=1)
    mask = None if attention_mask is None else torch.cat([attention_mask, torch.ones_like(tokens)], dim=1)
    with torch.no_grad():
        ref = hf_forward(hf_model, batch, input_ids=full, attention_mask=mask)[:, prompt.shape[1] - 1: -1]
    assert (logits - ref).abs().max().item() <= ATOL
    assert torch.equal(ref.argmax(-1), tokens)


# ---------------------------------------------------------------------------------------------- tests
def test_tp1_logits_parity_tied_untied_gqa_padded_vocab(tp1, hf_reference):
    for name in ("untied", "tied_kv1"):
        res = tp1[name]
        assert (res["vocab"], res["padded_vocab"]) == (301, 384)
        diff = (res["logits"] - hf_reference[name]["logits"]).abs().max().item()
        assert diff <= ATOL, f"{name}: max |dlogit| {diff}"
        assert torch.all(res["pad_logits"] == -1.0e4)  # padded vocabulary never wins a softmax


def test_hf_megatron_hf_round_trip_is_bit_identical(tp1):
    for name in ("untied", "tied_kv1"):
        res = tp1[name]
        expected = [n for n in res["hf_names"] if not (name == "tied_kv1" and n == "lm_head.weight")]
        assert res["exported"] == expected
        assert res["not_identical"] == []
    assert "lm_head.weight" in tp1["untied"]["exported"]
    assert "lm_head.weight" not in tp1["tied_kv1"]["exported"]


def test_tp1_kv_cache_decoding_matches_full_forward(tp1, hf_models, vl_batch, hf_forward, hf_reference):
    tokens, logits = tp1["untied"]["decode"]
    assert tokens.shape == (3, N_NEW)
    _check_decode(tokens, logits, hf_models["untied"], vl_batch, hf_forward)
    # the first decoded token's logits are the prompt's last-position logits
    assert (logits[:, 0] - hf_reference["untied"]["logits"][:, -1]).abs().max().item() <= ATOL


def test_tp1_left_padding_attention_mask(tp1, hf_models, vl_batch, hf_forward, hf_reference):
    mask = vl_batch["attention_mask"].bool()
    ours, ref = tp1["untied"]["masked_logits"], hf_reference["untied"]["masked_logits"]
    assert (ours - ref)[mask].abs().max().item() <= ATOL  # padded positions are garbage in both
    tokens, logits = tp1["untied"]["masked_decode"]
    _check_decode(tokens, logits, hf_models["untied"], vl_batch, hf_forward, attention_mask=vl_batch["attention_mask"])


def test_tp1_per_token_loss_and_checkpoint_guards(tp1, hf_reference):
    res = tp1["untied"]
    assert res["trainer_forward_equal"]
    assert res["loss"] == pytest.approx(hf_reference["untied"]["loss"], rel=1e-5)
    atomic = res["atomic"]
    assert atomic["raised"] and not atomic["exists"] and not atomic["is_checkpoint"]
    assert "rcpa_checkpoint.json not found" in atomic["incomplete_refused"]
    assert "padded vocabulary of 384" in res["vocab_mismatch"] and "512" in res["vocab_mismatch"]


def test_tp2_logits_vision_grads_and_decoding(tp1, tp2, hf_reference, hf_models, vl_batch, hf_forward):
    ranks = tp2
    ref = hf_reference["untied"]
    for r in ranks:
        assert r["local_vocab"] == 384 // 2 and r["gathered_width"] == 384
        assert r["gathered_equal"] and r["loss_fn_equal"]
        assert (r["logits"] - ref["logits"]).abs().max().item() <= ATOL
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert r["tagged"]
    # vision grads: identical on both TP ranks after the average, and equal to HF's
    g0, g1 = ranks[0]["vision_grads"], ranks[1]["vision_grads"]
    assert set(g0) == set(ref["vision_grads"])
    for name, grad in g0.items():
        assert torch.equal(grad, g1[name]), name
        torch.testing.assert_close(grad, ref["vision_grads"][name], rtol=1e-4, atol=1e-6, msg=name)
    tokens, logits = ranks[0]["decode"]
    assert torch.equal(tokens, ranks[1]["decode"][0])
    assert torch.equal(tokens, tp1["untied"]["decode"][0])
    _check_decode(tokens, logits, hf_models["untied"], vl_batch, hf_forward)


def test_pp2_logits_tied_untied_and_pipelined_decoding(tp1, tp2, tiny_models, hf_reference, hf_models, vl_batch,
                                                       hf_forward):
    from safetensors.torch import load_file

    from megatron_rcpa.testing.launcher import run_distributed

    ckpts = {name: tp1[name]["ckpt"] for name in ("untied", "tied_kv1")}
    ckpts["untied_converted_at_tp2"] = tp2[0]["converted_here"]  # converted on another grid, loaded at PP=2
    first, last = run_distributed(pp2_worker, world_size=2, pp=2, args=(ckpts, vl_batch), timeout=300)
    reference = dict(hf_reference, untied_converted_at_tp2=hf_reference["untied"])
    for name in ckpts:
        assert first[name]["has_vision"] and not last[name]["has_vision"]
        assert first[name]["num_layers_here"] == last[name]["num_layers_here"] == 1
        assert first[name]["logits"] is None
        diff = (last[name]["logits"] - reference[name]["logits"]).abs().max().item()
        assert diff <= ATOL, f"{name}: max |dlogit| {diff}"
        # the two stages export disjoint HF tensors that together are the original files, bit for bit
        both = {**first[name]["exported"], **last[name]["exported"]}
        assert len(both) == len(first[name]["exported"]) + len(last[name]["exported"])
        original = load_file(os.path.join(tiny_models[name.replace("_converted_at_tp2", "")], "model.safetensors"))
        assert sorted(both) == sorted(original)
        assert all(torch.equal(both[n], original[n]) for n in original)
    tokens, logits = last["untied"]["decode"]
    assert torch.equal(tokens, first["untied"]["decode"][0])
    assert torch.equal(tokens, tp1["untied"]["decode"][0])
    _check_decode(tokens, logits, hf_models["untied"], vl_batch, hf_forward)


def test_export_tool_on_a_pp2_grid(tp1, tiny_models, tmp_path):
    """convert_megatron_to_hf on two pipeline stages: each stage writes its files, named and indexed after."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_rcpa.convert.megatron_to_hf import convert_megatron_to_hf

    out = tmp_path / "exported"
    files = convert_megatron_to_hf(tp1["untied"]["ckpt"], str(out), pp=2, max_shard_size="1MB", timeout=300)
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["visual.patch_embed.proj.weight"] == files[0]
    assert index["weight_map"]["lm_head.weight"] == files[1]
    original = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_models["untied"]).state_dict()
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out)).state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
