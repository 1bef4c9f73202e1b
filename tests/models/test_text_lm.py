"""Plain text LMs (LlamaForCausalLM, Qwen2ForCausalLM) through the converters and the megatron text policy:
HF -> megatron -> HF bit-identity, logits parity vs transformers at TP=1 / TP=2 / PP=2 (fp32, 1e-4), left
padding, per-token loss, KV-cache decoding (also through the PP schedule), and the planning errors.

* ``llama``: no QKV bias, untied, GQA (4 heads / 2 KV heads);
* ``qwen2``: QKV bias, tied embeddings, one KV head.

Both have vocabulary 301 (padded to 384). Three spawns in all (TP1, TP2, PP2).
"""

from __future__ import annotations

import os

import pytest
import torch

ATOL = 1e-4
N_NEW = 4
SEQ = 12


def save_tiny_text_lm(path, kind, *, seed=0, tied=False, num_key_value_heads=2, **overrides):
    """A random tiny Llama / Qwen2 causal LM saved with save_pretrained (norms and biases made non-trivial)."""
    from megatron_rcpa.models.tiny import save_tiny_text_lm as save

    return save(path, kind, seed=seed, tie_word_embeddings=tied, num_key_value_heads=num_key_value_heads,
                **overrides)


# ------------------------------------------------------------------------------------- worker helpers
def _decode(policy, batch, attention_mask=None):
    from megatron_rcpa.models.inference import greedy_generate

    return greedy_generate(policy, batch["input_ids"], max_new_tokens=N_NEW, attention_mask=attention_mask,
                           return_logits=True)


def tp1_worker(models, out_root, batch):
    from megatron_rcpa.convert.checkpoint import build_policy_from_checkpoint
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
        reader = HFCheckpointReader(hf_dir, family.hf_aliases)
        exported = dict(export_hf_tensors(policy, family, meta.hf_config))
        not_identical = [n for n, t in exported.items() if not torch.equal(t, reader.get(n))]
        with torch.no_grad():
            logits = policy(input_ids=batch["input_ids"])
            masked = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = policy(input_ids=batch["input_ids"], labels=batch["labels"])
            via_trainer = trainer_forward(policy, {"tokens": batch["input_ids"]})
        errors = {}
        for what, kwargs in (("pixels", {"pixel_values": torch.zeros(4, 8)}),
                             ("positions", {"position_ids": torch.zeros_like(batch["input_ids"])})):
            try:
                policy(input_ids=batch["input_ids"], **kwargs)
            except ValueError as exc:
                errors[what] = str(exc)
        results[name] = {
            "ckpt": ckpt, "family": meta.family, "vocab": meta.vocab_size, "padded_vocab": meta.padded_vocab_size,
            "logits": logits[..., : meta.vocab_size].clone(), "pad_logits": logits[..., meta.vocab_size:].clone(),
            "masked_logits": masked[..., : meta.vocab_size].clone(), "loss": float(loss.sum()),
            "trainer_forward_equal": torch.equal(via_trainer, logits),
            "hf_names": reader.names(), "exported": sorted(exported), "not_identical": not_identical,
            "decode": _decode(policy, batch),
            "masked_decode": _decode(policy, batch, attention_mask=batch["attention_mask"]),
            "errors": errors,
        }
        reader.close()
    return results


def tp2_worker(ckpts, batch):
    from megatron.core import parallel_state

    from megatron_rcpa.convert.checkpoint import build_policy_from_checkpoint
    from megatron_rcpa.models.inference import gather_vocab_logits

    out = {"tp_rank": parallel_state.get_tensor_model_parallel_rank()}
    for name, ckpt in ckpts.items():
        policy, meta = build_policy_from_checkpoint(ckpt)
        policy.eval()
        with torch.no_grad():
            local = policy(input_ids=batch["input_ids"])
            loss = policy(input_ids=batch["input_ids"], labels=batch["labels"])
        out[name] = {"local_vocab": local.shape[-1], "logits": gather_vocab_logits(local, meta.vocab_size),
                     "loss": float(loss.sum()), "decode": _decode(policy, batch)}
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
        outputs = pipeline_forward(policy, [{"input_ids": ids}], seq_length=ids.shape[1],
                                   micro_batch_size=ids.shape[0])
        out[name] = {"logits": outputs[0][..., : meta.vocab_size] if outputs is not None else None,
                     "num_layers_here": len(policy.language_model.decoder.layers),
                     "decode": pipeline_greedy_generate(policy, ids, max_new_tokens=N_NEW, return_logits=True),
                     "exported": dict(export_hf_tensors(policy, family_by_name(meta.family), meta.hf_config))}
    return out


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_text_lm")
    return {
        "llama": save_tiny_text_lm(str(root / "llama"), "llama", seed=0),
        "qwen2": save_tiny_text_lm(str(root / "qwen2"), "qwen2", seed=1, tied=True, num_key_value_heads=1),
    }


@pytest.fixture(scope="module")
def text_batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 301, (3, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, :3] = 0  # a left-padded row
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 301, ids.shape, generator=gen)}


@pytest.fixture(scope="module")
def hf_text_models(text_models):
    from transformers import AutoModelForCausalLM

    return {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for name, path in text_models.items()}


@pytest.fixture(scope="module")
def hf_text_reference(hf_text_models, text_batch):
    out = {}
    for name, model in hf_text_models.items():
        with torch.no_grad():
            logits = model(input_ids=text_batch["input_ids"]).logits
            masked = model(input_ids=text_batch["input_ids"], attention_mask=text_batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), text_batch["labels"].flatten(), reduction="sum")
        out[name] = {"logits": logits, "masked_logits": masked, "loss": float(loss)}
    return out


@pytest.fixture(scope="module")
def text_tp1(text_models, text_batch, tmp_path_factory):
    from megatron_rcpa.testing.launcher import run_distributed

    out_root = str(tmp_path_factory.mktemp("text_ckpts"))
    return run_distributed(tp1_worker, world_size=1, args=(text_models, out_root, text_batch), timeout=300)[0]


def _check_decode(tokens, logits, model, batch, attention_mask=None):
    """Cached greedy decoding == argmax of full HF forwards over prompt + generated tokens."""
    prompt = batch["input_ids"]
    full = torch.cat([prompt, tokens], dim=1)
    mask = None if attention_mask is None else torch.cat([attention_mask, torch.ones_like(tokens)], dim=1)
    with torch.no_grad():
        ref = model(input_ids=full, attention_mask=mask).logits[:, prompt.shape[1] - 1: -1]
    assert (logits - ref).abs().max().item() <= ATOL
    assert torch.equal(ref.argmax(-1), tokens)


# ---------------------------------------------------------------------------------------------- tests
def test_family_detection_and_tables():
    from megatron_rcpa.convert.families import family_for_config

    assert family_for_config({"architectures": ["LlamaForCausalLM"]}).name == "llama"
    assert family_for_config({"architectures": ["Qwen2ForCausalLM"]}).name == "qwen2"
    assert family_for_config({"model_type": "qwen2"}).name == "qwen2"


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
def test_tp1_round_trip_logits_loss_padding_and_decode(text_tp1, hf_text_reference, hf_text_models, text_batch):
    mask = text_batch["attention_mask"].bool()
    for name in ("llama", "qwen2"):
        res, ref = text_tp1[name], hf_text_reference[name]
        assert res["family"] == name and (res["vocab"], res["padded_vocab"]) == (301, 384)
        # HF -> megatron -> HF: every tensor back, bit for bit (no lm_head for the tied model)
        expected = [n for n in res["hf_names"] if n != "lm_head.weight"] if name == "qwen2" else res["hf_names"]
        assert res["exported"] == expected and res["not_identical"] == []
        assert ("lm_head.weight" in res["exported"]) == (name == "llama")
        assert ("model.layers.0.self_attn.q_proj.bias" in res["exported"]) == (name == "qwen2")
        diff = (res["logits"] - ref["logits"]).abs().max().item()
        assert diff <= ATOL, f"{name}: max |dlogit| {diff}"
        assert torch.all(res["pad_logits"] == -1.0e4)
        assert (res["masked_logits"] - ref["masked_logits"])[mask].abs().max().item() <= ATOL
        assert res["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert res["trainer_forward_equal"]
        assert "pixel_values" in res["errors"]["pixels"] and "position_ids" in res["errors"]["positions"]
        _check_decode(*res["decode"], hf_text_models[name], text_batch)
        _check_decode(*res["masked_decode"], hf_text_models[name], text_batch,
                      attention_mask=text_batch["attention_mask"])
        # the first decoded token's logits are the prompt's last-position logits
        assert (res["decode"][1][:, 0] - ref["logits"][:, -1]).abs().max().item() <= ATOL


@pytest.mark.megatron
@pytest.mark.multiproc
def test_tp2_logits_loss_and_decode(text_tp1, hf_text_reference, hf_text_models, text_batch):
    from megatron_rcpa.testing.launcher import run_distributed

    ckpts = {"llama": text_tp1["llama"]["ckpt"]}  # qwen2 has one KV head: TP=1 only
    ranks = run_distributed(tp2_worker, world_size=2, tp=2, args=(ckpts, text_batch), timeout=300)
    ref = hf_text_reference["llama"]
    for r in ranks:
        res = r["llama"]
        assert res["local_vocab"] == 384 // 2
        assert (res["logits"] - ref["logits"]).abs().max().item() <= ATOL
        assert res["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    tokens, logits = ranks[0]["llama"]["decode"]
    assert torch.equal(tokens, ranks[1]["llama"]["decode"][0])
    assert torch.equal(tokens, text_tp1["llama"]["decode"][0])
    _check_decode(tokens, logits, hf_text_models["llama"], text_batch)


@pytest.mark.megatron
@pytest.mark.multiproc
def test_pp2_logits_export_and_pipelined_decode(text_tp1, text_models, hf_text_reference, hf_text_models,
                                                text_batch):
    from safetensors.torch import load_file

    from megatron_rcpa.testing.launcher import run_distributed

    ckpts = {name: text_tp1[name]["ckpt"] for name in ("llama", "qwen2")}
    first, last = run_distributed(pp2_worker, world_size=2, pp=2, args=(ckpts, text_batch), timeout=300)
    for name in ckpts:
        assert first[name]["logits"] is None
        assert first[name]["num_layers_here"] == last[name]["num_layers_here"] == 1
        diff = (last[name]["logits"] - hf_text_reference[name]["logits"]).abs().max().item()
        assert diff <= ATOL, f"{name}: max |dlogit| {diff}"
        both = {**first[name]["exported"], **last[name]["exported"]}
        assert len(both) == len(first[name]["exported"]) + len(last[name]["exported"])
        original = load_file(os.path.join(text_models[name], "model.safetensors"))
        assert sorted(both) == sorted(original)
        assert all(torch.equal(both[n], original[n]) for n in original)
        tokens, logits = last[name]["decode"]
        assert torch.equal(tokens, first[name]["decode"][0])
        assert torch.equal(tokens, text_tp1[name]["decode"][0])
        _check_decode(tokens, logits, hf_text_models[name], text_batch)
