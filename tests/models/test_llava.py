"""LLaVA (LlavaForConditionalGeneration) through the converters and the megatron LLaVA policy: HF -> megatron
-> HF bit-identity (unused tower tensors included), logits parity vs transformers at TP=1 / TP=2 / PP=2
(fp32, 1e-4) with images, left padding, per-token loss, the vision gradients of a loss (TP=1 and the
TP-sharded ViT at TP=2) against transformers', KV-cache decoding (also through the PP schedule), and the
errors for bad input.

* ``clip_llama``: CLIP tower (class token, pre-LayerNorm, quick_gelu), ``vision_feature_layer=-2`` (the last
  of 3 layers unused), strategy ``default`` (CLS dropped); Llama decoder, untied, GQA 4/2;
* ``siglip_qwen2``: SigLIP tower (patch bias, gelu-tanh, pooling head unused), ``vision_feature_layer=-1``,
  strategy ``full``; Qwen2 decoder (QKV bias), tied embeddings.

Three spawns in all (TP1, TP2, PP2).
"""

from __future__ import annotations

import os

import pytest
import torch

ATOL = 1e-4
N_NEW = 3
MODELS = {
    "clip_llama": dict(vision="clip", text="llama", seed=0),
    "siglip_qwen2": dict(vision="siglip", text="qwen2", seed=1, tie_word_embeddings=True,
                         vision_feature_layer=-1, vision_feature_select_strategy="full"),
}


# ------------------------------------------------------------------------------------- worker helpers
def _hf_named_grads(policy, family, hf_config, prefixes=("vision_model.", "vision_projection.")):
    """Gradients of the ViT / projector parameters under their HF names (TP shards gathered)."""
    from megatron.core import parallel_state

    from megatron_rcpa.convert.hf_to_megatron import bind_policy_tensors
    from megatron_rcpa.convert.weight_maps import Kind, to_hf_tensors

    layouts = family.layouts(hf_config, int(policy.padded_vocab_size))
    tp = parallel_state.get_tensor_model_parallel_world_size()
    out = {}
    for name, tensor, tmap, hf_names in bind_policy_tensors(policy, family, hf_config):
        if not name.startswith(prefixes):
            continue
        grad = tensor.grad
        if tmap.kind is Kind.REPLICATED or tp == 1:
            shards = [grad] * (1 if tmap.kind is Kind.REPLICATED else tp)
        else:
            shards = [torch.empty_like(grad) for _ in range(tp)]
            torch.distributed.all_gather(shards, grad.contiguous(),
                                         group=parallel_state.get_tensor_model_parallel_group())
        out.update(zip(hf_names, to_hf_tensors(tmap.kind, shards, layout=layouts[tmap.layout])))
    return out


def _logits_loss_grads(policy, meta, batch):
    from megatron_rcpa.convert.families import family_by_name
    from megatron_rcpa.models.inference import gather_vocab_logits

    with torch.no_grad():
        local = policy(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
    policy.zero_grad()
    loss = policy(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], labels=batch["labels"]).sum()
    loss.backward()
    grads = _hf_named_grads(policy, family_by_name(meta.family), meta.hf_config)
    return {"local_vocab": local.shape[-1], "logits": gather_vocab_logits(local, meta.vocab_size),
            "loss": float(loss.detach()), "grads": grads}


def _decode(policy, batch, attention_mask=None):
    from megatron_rcpa.models.inference import greedy_generate

    return greedy_generate(policy, batch["input_ids"], pixel_values=batch["pixel_values"],
                           max_new_tokens=N_NEW, attention_mask=attention_mask, return_logits=True)


def tp1_worker(models, out_root, batches):
    from megatron_rcpa.convert.checkpoint import build_policy_from_checkpoint
    from megatron_rcpa.convert.families import family_by_name
    from megatron_rcpa.convert.hf_io import HFCheckpointReader
    from megatron_rcpa.convert.hf_to_megatron import convert_rank, plan_hf_to_megatron
    from megatron_rcpa.convert.megatron_to_hf import export_hf_tensors
    from megatron_rcpa.models.policy_base import trainer_forward

    results = {}
    for name, hf_dir in models.items():
        batch = batches[name]
        ckpt = os.path.join(out_root, name)
        convert_rank(plan_hf_to_megatron(hf_dir), ckpt)
        policy, meta = build_policy_from_checkpoint(ckpt)
        policy.eval()
        family = family_by_name(meta.family)
        reader = HFCheckpointReader(hf_dir, family.hf_aliases)
        exported = dict(export_hf_tensors(policy, family, meta.hf_config))
        not_identical = [n for n, t in exported.items() if not torch.equal(t, reader.get(n))]
        ids, pv = batch["input_ids"], batch["pixel_values"]
        with torch.no_grad():
            masked = policy(input_ids=ids, pixel_values=pv, attention_mask=batch["attention_mask"])
            via_trainer = trainer_forward(policy, {"tokens": ids, "pixel_values": pv})
        errors = {}
        for what, kwargs in (
            ("grid", {"pixel_values": pv, "image_grid_thw": torch.ones(3, 3, dtype=torch.long)}),
            ("size", {"pixel_values": pv[:, :, :14]}),
            ("count", {"pixel_values": pv[:2]}),
            ("no_pixels", {}),
            ("positions", {"pixel_values": pv, "position_ids": torch.zeros_like(ids)}),
        ):
            try:
                policy(input_ids=ids, **kwargs)
            except ValueError as exc:
                errors[what] = str(exc)
        out = _logits_loss_grads(policy, meta, batch)
        out.update({
            "ckpt": ckpt, "family": meta.family, "vocab": meta.vocab_size, "padded_vocab": meta.padded_vocab_size,
            "pad_logits_ok": bool(torch.all(via_trainer[..., meta.vocab_size:] == -1.0e4)),
            "masked_logits": masked[..., : meta.vocab_size].clone(),
            "trainer_forward_equal": torch.equal(via_trainer[..., : meta.vocab_size], out["logits"]),
            "hf_names": reader.names(), "exported": sorted(exported), "not_identical": not_identical,
            "unused_buffers": sorted(n for n, _ in policy.named_buffers() if n.startswith("vision_unused.")),
            "vision_layers": len(policy.vision_model.decoder.layers),
            "decode": _decode(policy, batch),
            "masked_decode": _decode(policy, batch, attention_mask=batch["attention_mask"]),
            "errors": errors,
        })
        results[name] = out
        reader.close()
    return results


def _rollout_and_train(ckpt, batch):
    """The training interfaces on a fresh policy: RolloutEngine rollouts (KV cache, left padding) from two
    image prompts, their log-probs recomputed through the PP schedule (right padding), one RCPA train_step
    with megatron DDP + optimizer. Returns what the test compares."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_rcpa.algo.config import LossConfig
    from megatron_rcpa.convert.checkpoint import build_policy_from_checkpoint
    from megatron_rcpa.models.policy_base import trainer_forward
    from megatron_rcpa.rollout.batch import pack_rollouts
    from megatron_rcpa.rollout.engine import PromptInput, RolloutEngine, SamplingParams
    from megatron_rcpa.rollout.sampling import StopChecker
    from megatron_rcpa.train.step import StepConfig, compute_logprobs, split_micro_batches, train_step

    policy, meta = build_policy_from_checkpoint(ckpt)
    ids, pv = batch["input_ids"], batch["pixel_values"]
    prompts = [PromptInput(key="one", prompt_ids=ids[0].tolist(), pixel_values=pv[:1]),
               PromptInput(key="two", prompt_ids=ids[1].tolist(), pixel_values=pv[1:])]
    # nothing banned, so that the sampled log-probs are those of the full softmax (the trainer bans the image
    # token, which renormalises); these seeds happen not to sample it
    engine = RolloutEngine(policy, vocab_size=meta.vocab_size, pad_id=0, stop=StopChecker(),
                           params=SamplingParams(max_new_tokens=4))
    rollouts = engine.generate(prompts, prefix_lens=[0, 0], group_size=2, step=0)
    assert not any(policy.image_token_id in r.generated_tokens for r in rollouts)
    packed = pack_rollouts(rollouts, [1.0, -1.0, 0.5, -0.5], pad_id=0)
    micro = split_micro_batches(packed, micro_batch_size=2, group_size=2)
    extras = [{"pixel_values": prompts[i].pixel_values.repeat(2, 1, 1, 1)} for i in range(2)]

    ddp = DistributedDataParallel(policy.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), policy)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, bf16=False,
                                                 params_dtype=torch.float32), [ddp])
    policy.config.finalize_model_grads_func = finalize_model_grads
    cfg = StepConfig(loss=LossConfig(), vocab_size=meta.vocab_size, impl="torch")
    old = compute_logprobs(ddp, micro, cfg, trainer_forward, extras=extras)
    mismatch = max(((o - torch.as_tensor(m.rollout_logp)) * m.gen_mask).abs().max().item()
                   for o, m in zip(old, micro))
    qkv = policy.vision_model.decoder.layers[0].self_attention.linear_qkv.weight
    before = qkv.detach().clone()
    metrics = train_step(ddp, opt, micro, old, cfg, forward_fn=trainer_forward, extras=extras)
    return {"generated": sum(len(r.generated_tokens) for r in rollouts), "logp_mismatch": mismatch,
            "metrics": metrics, "vit_qkv_moved": (qkv.detach() - before).abs().max().item(),
            "ln_pre": policy.vision_model.ln_pre.weight.detach().clone()}


def tp2_worker(ckpts, batches):
    from megatron.core import parallel_state

    from megatron_rcpa.convert.checkpoint import build_policy_from_checkpoint

    out = {"tp_rank": parallel_state.get_tensor_model_parallel_rank()}
    for name, ckpt in ckpts.items():
        policy, meta = build_policy_from_checkpoint(ckpt)
        policy.eval()
        res = _logits_loss_grads(policy, meta, batches[name])
        res["vision_qkv_rows"] = policy.vision_model.decoder.layers[0].self_attention.linear_qkv.weight.shape[0]
        res["decode"] = _decode(policy, batches[name])
        out[name] = res
    out["train"] = _rollout_and_train(ckpts["clip_llama"], batches["clip_llama"])
    return out


def pp2_worker(ckpts, batches):
    from megatron_rcpa.convert.checkpoint import build_policy_from_checkpoint
    from megatron_rcpa.convert.families import family_by_name
    from megatron_rcpa.convert.megatron_to_hf import export_hf_tensors
    from megatron_rcpa.models.inference import pipeline_greedy_generate
    from megatron_rcpa.models.pipeline import pipeline_forward

    out = {}
    for name, ckpt in ckpts.items():
        batch = batches[name]
        ids = batch["input_ids"]
        policy, meta = build_policy_from_checkpoint(ckpt)
        policy.eval()
        outputs = pipeline_forward(policy, [{"input_ids": ids, "pixel_values": batch["pixel_values"]}],
                                   seq_length=ids.shape[1], micro_batch_size=ids.shape[0])
        out[name] = {"logits": outputs[0][..., : meta.vocab_size] if outputs is not None else None,
                     "has_vision": policy.vision_model is not None,
                     "decode": pipeline_greedy_generate(policy, ids, pixel_values=batch["pixel_values"],
                                                        max_new_tokens=N_NEW),
                     "exported": dict(export_hf_tensors(policy, family_by_name(meta.family), meta.hf_config))}
    return out


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def llava_models(tmp_path_factory):
    from megatron_rcpa.models.tiny import save_tiny_llava

    root = tmp_path_factory.mktemp("tiny_llava")
    return {name: save_tiny_llava(str(root / name), **kwargs) for name, kwargs in MODELS.items()}


@pytest.fixture(scope="module")
def llava_batches(llava_models):
    """Per model: the parity-gate batch (one image; two images) plus a text-only row whose first 3 tokens
    are marked as left padding in ``attention_mask`` (used only where passed), and random labels."""
    from megatron_rcpa.convert.hf_io import load_hf_config
    from megatron_rcpa.convert.verify import build_verification_batch

    out = {}
    for name, path in llava_models.items():
        config = load_hf_config(path)
        batch = build_verification_batch(config, asset_dirs=[path], seed=3)
        ids = batch["input_ids"]
        text_row = torch.randint(0, 250, (1, ids.shape[1]), generator=torch.Generator().manual_seed(5))
        ids = torch.cat([ids, text_row], dim=0)
        mask = torch.ones_like(ids)
        mask[2, :3] = 0
        labels = torch.randint(0, 300, ids.shape, generator=torch.Generator().manual_seed(7))
        out[name] = {"input_ids": ids, "pixel_values": batch["pixel_values"], "attention_mask": mask,
                     "labels": labels}
    return out


@pytest.fixture(scope="module")
def hf_llava(llava_models):
    from transformers import LlavaForConditionalGeneration

    return {name: LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
            for name, path in llava_models.items()}


@pytest.fixture(scope="module")
def hf_llava_reference(hf_llava, llava_batches):
    """HF logits (plain and left-padded), the summed cross entropy of the labels and the gradients of the
    vision tower / projector under on-disk names."""
    from megatron_rcpa.convert.hf_io import normalize_name
    from megatron_rcpa.models.families.llava import LLAVA

    out = {}
    for name, model in hf_llava.items():
        batch = llava_batches[name]
        with torch.no_grad():
            masked = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                           attention_mask=batch["attention_mask"]).logits
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
        loss.backward()
        grads = {normalize_name(n, LLAVA.hf_aliases): p.grad.clone() for n, p in model.named_parameters()
                 if p.grad is not None and ("vision_tower" in n or "multi_modal_projector" in n)}
        out[name] = {"logits": logits.detach(), "masked_logits": masked, "loss": float(loss.detach()),
                     "grads": grads}
    return out


@pytest.fixture(scope="module")
def llava_tp1(llava_models, llava_batches, tmp_path_factory):
    from megatron_rcpa.testing.launcher import run_distributed

    out_root = str(tmp_path_factory.mktemp("llava_ckpts"))
    return run_distributed(tp1_worker, world_size=1, args=(llava_models, out_root, llava_batches), timeout=300)[0]


def _check_decode(tokens, logits, model, batch, attention_mask=None):
    """Cached greedy decoding == argmax of full HF forwards over prompt + generated tokens."""
    prompt = batch["input_ids"]
    full = torch.cat([prompt, tokens], dim=1)
    mask = None if attention_mask is None else torch.cat([attention_mask, torch.ones_like(tokens)], dim=1)
    with torch.no_grad():
        ref = model(input_ids=full, pixel_values=batch["pixel_values"],
                    attention_mask=mask).logits[:, prompt.shape[1] - 1: -1]
    if logits is not None:
        assert (logits - ref).abs().max().item() <= ATOL
    assert torch.equal(ref.argmax(-1), tokens)


def _check_grads(grads, reference, rtol=1e-4):
    assert sorted(grads) == sorted(reference)
    assert "multi_modal_projector.linear_1.weight" in grads
    assert "vision_tower.encoder.layers.0.self_attn.q_proj.weight" in grads
    assert any(g.abs().max() > 0 for g in grads.values())
    for n, g in grads.items():
        scale = reference[n].abs().max().item() + 1e-6
        assert (g - reference[n]).abs().max().item() <= rtol * scale + 1e-6, n


# ---------------------------------------------------------------------------------------------- tests
def test_family_detection_and_vision_dims(llava_models):
    from megatron_rcpa.convert.families import family_for_config
    from megatron_rcpa.convert.hf_io import load_hf_config, read_config_dict
    from megatron_rcpa.models.llava import llava_unused_vision_tensors, llava_vision_dims

    clip = load_hf_config(llava_models["clip_llama"])
    siglip = load_hf_config(llava_models["siglip_qwen2"])
    assert family_for_config(read_config_dict(llava_models["clip_llama"])).name == "llava"
    vd = llava_vision_dims(clip)
    assert (vd.kind, vd.num_layers, vd.num_layers_used, vd.tokens_per_image) == ("clip", 3, 2, 4)
    assert sorted(llava_unused_vision_tensors(clip)) == sorted(
        [f"encoder.layers.2.{p}" for p in ("layer_norm1.bias", "layer_norm1.weight", "layer_norm2.bias",
                                            "layer_norm2.weight", "mlp.fc1.bias", "mlp.fc1.weight", "mlp.fc2.bias",
                                            "mlp.fc2.weight", "self_attn.k_proj.bias", "self_attn.k_proj.weight",
                                            "self_attn.out_proj.bias", "self_attn.out_proj.weight",
                                            "self_attn.q_proj.bias", "self_attn.q_proj.weight",
                                            "self_attn.v_proj.bias", "self_attn.v_proj.weight")]
        + ["post_layernorm.bias", "post_layernorm.weight"])
    vd = llava_vision_dims(siglip)
    assert (vd.kind, vd.num_layers_used, vd.tokens_per_image) == ("siglip", 3, 4)
    unused = llava_unused_vision_tensors(siglip)
    assert "post_layernorm.weight" in unused and "head.probe" in unused
    assert not any(n.startswith("encoder.") for n in unused)


def test_planning_and_config_errors_name_the_problem(llava_models, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_rcpa.convert.errors import ConversionError
    from megatron_rcpa.convert.hf_to_megatron import plan_hf_to_megatron

    def variant(name, **changes):
        path = tmp_path / name
        shutil.copytree(llava_models["clip_llama"], path)
        config = json.loads((path / "config.json").read_text())
        for key, value in changes.items():
            target = config
            *parents, leaf = key.split("/")
            for p in parents:
                target = target[p]
            target[leaf] = value
        (path / "config.json").write_text(json.dumps(config))
        return str(path)

    with pytest.raises(ConversionError, match="TP=8 does not divide"):
        plan_hf_to_megatron(llava_models["clip_llama"], tp=8)
    with pytest.raises(ConversionError, match=r"TP=3 does not divide"):
        plan_hf_to_megatron(llava_models["clip_llama"], tp=3)
    with pytest.raises(ConversionError, match="vision_feature_layer=\\[-2, -1\\].*several feature layers"):
        plan_hf_to_megatron(variant("multi", vision_feature_layer=[-2, -1]))
    with pytest.raises(ConversionError, match="vision_feature_layer=7 selects the output of 7 of 3"):
        plan_hf_to_megatron(variant("far", vision_feature_layer=7))
    with pytest.raises(ConversionError, match="vision_config.model_type='dinov2'"):
        plan_hf_to_megatron(variant("dino", **{"vision_config/model_type": "dinov2"}))
    with pytest.raises(ConversionError, match="projector_hidden_act='swish_glu'"):
        plan_hf_to_megatron(variant("act", projector_hidden_act="swish_glu"))
    broken = variant("broken")
    tensors = load_file(os.path.join(broken, "model.safetensors"))
    del tensors["vision_tower.encoder.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"missing tensor\(s\).*vision_tower.encoder.layers.1.self_attn.k_proj"):
        plan_hf_to_megatron(broken)


def test_transformers4_tensor_names_are_accepted(llava_models, tmp_path):
    """Hub LLaVA files written by transformers 4 keep the tower under ``vision_tower.vision_model.``."""
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_rcpa.convert.hf_to_megatron import plan_hf_to_megatron

    path = tmp_path / "legacy"
    shutil.copytree(llava_models["clip_llama"], path)
    tensors = load_file(str(path / "model.safetensors"))
    legacy = {n.replace("vision_tower.", "vision_tower.vision_model.", 1): t for n, t in tensors.items()}
    save_file(legacy, str(path / "model.safetensors"), metadata={"format": "pt"})
    plan = plan_hf_to_megatron(str(path))
    assert plan.family == "llava"


@pytest.mark.megatron
@pytest.mark.multiproc
def test_tp1_round_trip_logits_grads_padding_decode_and_errors(llava_tp1, hf_llava_reference, hf_llava,
                                                               llava_batches):
    for name in MODELS:
        res, ref, batch = llava_tp1[name], hf_llava_reference[name], llava_batches[name]
        assert res["family"] == "llava" and (res["vocab"], res["padded_vocab"]) == (301, 384)
        # HF -> megatron -> HF: every tensor back bit for bit, the unused tower tensors included
        tied = name == "siglip_qwen2"
        expected = [n for n in res["hf_names"] if n != "language_model.lm_head.weight"] if tied else res["hf_names"]
        assert res["exported"] == sorted(expected) and res["not_identical"] == []
        assert res["unused_buffers"], "the unused HF tower tensors must be kept"
        assert res["vision_layers"] == (2 if name == "clip_llama" else 3)
        diff = (res["logits"] - ref["logits"]).abs().max().item()
        assert diff <= ATOL, f"{name}: max |dlogit| {diff}"
        assert res["pad_logits_ok"] and res["trainer_forward_equal"]
        keep = batch["attention_mask"].bool()
        assert (res["masked_logits"] - ref["masked_logits"])[keep].abs().max().item() <= ATOL
        assert res["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        _check_grads(res["grads"], ref["grads"])
        _check_decode(*res["decode"], hf_llava[name], batch)
        _check_decode(*res["masked_decode"], hf_llava[name], batch, attention_mask=batch["attention_mask"])
        errors = res["errors"]
        assert "image_grid_thw" in errors["grid"]
        assert "pixel_values must be [num_images, 3, 28, 28]" in errors["size"]
        assert "but pixel_values has 2 image(s)" in errors["count"]
        assert "pixel_values is None" in errors["no_pixels"]
        assert "position_ids" in errors["positions"]


@pytest.mark.megatron
@pytest.mark.multiproc
def test_tp2_sharded_vit_logits_grads_and_decode(llava_tp1, hf_llava_reference, hf_llava, llava_batches):
    from megatron_rcpa.testing.launcher import run_distributed

    ckpts = {name: llava_tp1[name]["ckpt"] for name in MODELS}
    ranks = run_distributed(tp2_worker, world_size=2, tp=2, args=(ckpts, llava_batches), timeout=300)
    for name in MODELS:
        ref = hf_llava_reference[name]
        for r in ranks:
            res = r[name]
            assert res["local_vocab"] == 384 // 2
            assert res["vision_qkv_rows"] == 3 * 32 // 2  # the ViT's QKV is split over TP
            assert (res["logits"] - ref["logits"]).abs().max().item() <= ATOL
            assert res["loss"] == pytest.approx(ref["loss"], rel=1e-5)
            _check_grads(res["grads"], ref["grads"])
        tokens, logits = ranks[0][name]["decode"]
        assert torch.equal(tokens, ranks[1][name]["decode"][0])
        assert torch.equal(tokens, llava_tp1[name]["decode"][0])
        _check_decode(tokens, logits, hf_llava[name], llava_batches[name])
    # the training interfaces: rollouts on the KV cache agree with the recomputed log-probs; one RCPA step
    # moves the TP-sharded ViT and keeps its replicated LayerNorm identical on both TP ranks
    for r in ranks:
        train = r["train"]
        assert train["generated"] == 16 and train["logp_mismatch"] <= ATOL
        assert train["metrics"]["update_ok"] == 1.0 and train["metrics"]["grad_norm"] > 0
        assert train["vit_qkv_moved"] > 0
    assert torch.equal(ranks[0]["train"]["ln_pre"], ranks[1]["train"]["ln_pre"])


@pytest.mark.megatron
@pytest.mark.multiproc
def test_pp2_vision_on_first_stage_logits_export_and_decode(llava_tp1, llava_models, hf_llava_reference,
                                                            llava_batches):
    from safetensors.torch import load_file

    from megatron_rcpa.testing.launcher import run_distributed

    ckpts = {name: llava_tp1[name]["ckpt"] for name in MODELS}
    first, last = run_distributed(pp2_worker, world_size=2, pp=2, args=(ckpts, llava_batches), timeout=300)
    for name in MODELS:
        assert first[name]["has_vision"] and not last[name]["has_vision"]
        assert first[name]["logits"] is None
        diff = (last[name]["logits"] - hf_llava_reference[name]["logits"]).abs().max().item()
        assert diff <= ATOL, f"{name}: max |dlogit| {diff}"
        both = {**first[name]["exported"], **last[name]["exported"]}
        assert len(both) == len(first[name]["exported"]) + len(last[name]["exported"])
        original = load_file(os.path.join(llava_models[name], "model.safetensors"))
        assert sorted(both) == sorted(original)
        assert all(torch.equal(both[n], original[n]) for n in original)
        assert torch.equal(last[name]["decode"], first[name]["decode"])
        assert torch.equal(last[name]["decode"], llava_tp1[name]["decode"][0])
