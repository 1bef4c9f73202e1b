"""The per-family model-test harness, written once: tiny random HF checkpoints of each family, a batch and the
transformers reference per model, and three spawns per family (TP=1, TP=2, PP=2) whose workers convert
HF -> megatron, build the policy from the checkpoint and ship back what the tests compare.

What every family is checked for lives in ``test_policy_families.py`` (parametrized by family); what only
one family has (vision gradients, MRoPE, error messages, checkpoint guards...) in that family's test file,
reading the same results (``extra`` below: hooks that run inside the same spawns).

Family cases (``CASES``):

* ``qwen2_5_vl``: ``untied`` (4 query / 2 KV heads, separate lm_head) and ``tied_kv1`` (one KV head, tied);
  a real image batch (one image; two images; a text row);
* ``llava``: ``clip_llama`` (CLIP tower, ``vision_feature_layer=-2``, strategy ``default``; Llama, untied, GQA)
  and ``siglip_qwen2`` (SigLIP, ``vision_feature_layer=-1``, strategy ``full``; Qwen2, QKV bias, tied);
* ``text_lm``: ``llama`` (no QKV bias, untied, GQA 4/2) and ``qwen2`` (QKV bias, tied, one KV head).

Every model has vocabulary 301 (padded to 384). Each batch has three rows; the third is marked as left
padding over its first 3 tokens in ``attention_mask`` (used only where passed).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch

ATOL = 1e-4


# ------------------------------------------------------------------------------------------ batches
def _qwen_batches(models: Dict[str, str]) -> Dict[str, dict]:
    from megatron_rcpa.convert.hf_io import load_hf_config
    from megatron_rcpa.convert.verify import build_verification_batch

    config = load_hf_config(models["untied"])
    batch = build_verification_batch(config, asset_dirs=[models["untied"]], seed=3)
    ids = batch["input_ids"]
    text_row = torch.randint(0, 250, (1, ids.shape[1]), generator=torch.Generator().manual_seed(5))
    ids = torch.cat([ids, text_row], dim=0)
    mask = torch.ones_like(ids)
    mask[2, :3] = 0
    out = {"inputs": {"input_ids": ids, "pixel_values": batch["pixel_values"],
                      "image_grid_thw": batch["image_grid_thw"]},
           "attention_mask": mask,
           "labels": torch.randint(0, config.text_config.vocab_size, ids.shape,
                                   generator=torch.Generator().manual_seed(7))}
    return {name: out for name in models}


def _llava_batches(models: Dict[str, str]) -> Dict[str, dict]:
    """Per model: the parity-gate batch (one image; two images) plus a text-only row, and random labels."""
    from megatron_rcpa.convert.hf_io import load_hf_config
    from megatron_rcpa.convert.verify import build_verification_batch

    out = {}
    for name, path in models.items():
        config = load_hf_config(path)
        batch = build_verification_batch(config, asset_dirs=[path], seed=3)
        ids = batch["input_ids"]
        text_row = torch.randint(0, 250, (1, ids.shape[1]), generator=torch.Generator().manual_seed(5))
        ids = torch.cat([ids, text_row], dim=0)
        mask = torch.ones_like(ids)
        mask[2, :3] = 0
        labels = torch.randint(0, 300, ids.shape, generator=torch.Generator().manual_seed(7))
        out[name] = {"inputs": {"input_ids": ids, "pixel_values": batch["pixel_values"]}, "attention_mask": mask,
                     "labels": labels}
    return out


def _text_batches(models: Dict[str, str]) -> Dict[str, dict]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 301, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, :3] = 0
    batch = {"inputs": {"input_ids": ids}, "attention_mask": mask,
             "labels": torch.randint(0, 301, ids.shape, generator=gen)}
    return {name: batch for name in models}


# ----------------------------------------------------------------------------------- HF references
def hf_forward(model, batch, input_ids=None, attention_mask=None) -> torch.Tensor:
    """HF logits [B, S, V] of ``input_ids`` (default the batch's) with the batch's images, for any family."""
    inputs = dict(batch["inputs"])
    ids = inputs.pop("input_ids") if input_ids is None else input_ids
    inputs.pop("input_ids", None)
    if "image_grid_thw" in inputs:  # Qwen2.5-VL marks its image tokens
        inputs["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
    return model(input_ids=ids, attention_mask=attention_mask, **inputs).logits


def load_hf_model(path: str):
    import transformers

    from megatron_rcpa.convert.hf_io import read_config_dict

    arch = read_config_dict(path)["architectures"][0]
    return getattr(transformers, arch).from_pretrained(path, dtype=torch.float32).eval()


def _qwen_hf_extra(model, batch, name) -> dict:
    """The vision-tower gradients of the summed cross entropy (under the tower's own names)."""
    model.zero_grad()
    logits = hf_forward(model, batch)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
    loss.backward()
    grads = {n[len("model.visual."):]: p.grad.clone() for n, p in model.named_parameters()
             if n.startswith("model.visual.")}
    model.zero_grad(set_to_none=True)
    return {"vision_grads": grads}


def _llava_hf_extra(model, batch, name) -> dict:
    """The gradients of the vision tower / projector under on-disk names."""
    from megatron_rcpa.convert.hf_io import normalize_name
    from megatron_rcpa.models.families.llava import LLAVA

    model.zero_grad()
    logits = hf_forward(model, batch)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
    loss.backward()
    grads = {normalize_name(n, LLAVA.hf_aliases): p.grad.clone() for n, p in model.named_parameters()
             if p.grad is not None and ("vision_tower" in n or "multi_modal_projector" in n)}
    model.zero_grad(set_to_none=True)
    return {"grads": grads}


def hf_reference(model, batch, extra: Optional[Callable] = None, name: str = "") -> dict:
    """HF fp32 logits (plain and with the left-padding mask) and the summed cross entropy of the labels."""
    with torch.no_grad():
        logits = hf_forward(model, batch)
        masked = hf_forward(model, batch, attention_mask=batch["attention_mask"])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
    out = {"logits": logits, "masked_logits": masked, "loss": float(loss)}
    if extra is not None:
        out.update(extra(model, batch, name))
    return out


# ---------------------------------------------------------------------------------------- the cases
@dataclasses.dataclass(frozen=True)
class Case:
    family: str  # the registry name of the models' family (text_lm: per model)
    models: Dict[str, Dict[str, Any]]  # name -> save_tiny_hf keywords (plus "family" for text_lm)
    tied: Tuple[str, ...]  # the models with tied embeddings
    batches: Callable[[Dict[str, str]], Dict[str, dict]]
    tp2_models: Tuple[str, ...]  # the models checked at TP=2 (a one-KV-head model cannot be)
    n_new: int = 4  # tokens decoded with the KV cache
    vlm: bool = True
    hf_extra: Optional[Callable] = None  # (hf model, batch, name) -> extra reference entries
    tp1_extra: Optional[str] = None  # name of a hook in this module: (policy, meta, batch, name, ckpt, out_root)
    tp2_extra: Optional[str] = None  # (policy, meta, batch, name) -> dict, per model
    tp2_once: Optional[str] = None  # (ckpts, batches, models, out_root) -> dict, once per spawn
    #: (name, key of the TP=2 rank-0 result holding a checkpoint, the model it holds): also loaded at PP=2
    pp2_from_tp2: Optional[Tuple[str, str, str]] = None


CASES: Dict[str, Case] = {
    "qwen2_5_vl": Case(
        family="qwen2_5_vl",
        models={"untied": dict(seed=0), "tied_kv1": dict(seed=1, num_key_value_heads=1, tie_word_embeddings=True)},
        tied=("tied_kv1",), batches=_qwen_batches, tp2_models=("untied",), hf_extra=_qwen_hf_extra,
        tp1_extra="qwen_tp1_extra", tp2_extra="qwen_tp2_extra", tp2_once="qwen_tp2_once",
        pp2_from_tp2=("untied_converted_at_tp2", "converted_here", "untied")),
    "llava": Case(
        family="llava",
        models={"clip_llama": dict(vision="clip", text="llama", seed=0),
                "siglip_qwen2": dict(vision="siglip", text="qwen2", seed=1, tie_word_embeddings=True,
                                     vision_feature_layer=-1, vision_feature_select_strategy="full")},
        tied=("siglip_qwen2",), batches=_llava_batches, tp2_models=("clip_llama", "siglip_qwen2"), n_new=3,
        hf_extra=_llava_hf_extra, tp1_extra="llava_tp1_extra", tp2_extra="llava_tp2_extra",
        tp2_once="llava_tp2_once"),
    "text_lm": Case(
        family="text_lm",
        models={"llama": dict(family="llama", seed=0),
                "qwen2": dict(family="qwen2", seed=1, tie_word_embeddings=True, num_key_value_heads=1)},
        tied=("qwen2",), batches=_text_batches, tp2_models=("llama",), vlm=False, tp1_extra="text_tp1_extra"),
}


def save_case_models(case: Case, root: str) -> Dict[str, str]:
    """Each model of the case saved as a tiny HF checkpoint under ``root`` by its family's registry record."""
    from megatron_rcpa.models import families

    out = {}
    for name, kwargs in case.models.items():
        kwargs = dict(kwargs)
        family = families.get(kwargs.pop("family", case.family))
        out[name] = family.save_tiny_hf(os.path.join(root, name), **kwargs)
    return out


# ------------------------------------------------------------------------------------------- workers
def _decode(policy, batch, n_new, attention_mask=None):
    from megatron_rcpa.models.inference import greedy_generate

    inputs = dict(batch["inputs"])
    return greedy_generate(policy, inputs.pop("input_ids"), max_new_tokens=n_new, attention_mask=attention_mask,
                           return_logits=True, **inputs)


def tp1_worker(case_name, models, out_root, batches):
    from megatron_rcpa.convert.checkpoint import build_policy_from_checkpoint
    from megatron_rcpa.convert.families import family_by_name
    from megatron_rcpa.convert.hf_io import HFCheckpointReader
    from megatron_rcpa.convert.hf_to_megatron import convert_rank, plan_hf_to_megatron
    from megatron_rcpa.convert.megatron_to_hf import export_hf_tensors
    from megatron_rcpa.models.policy_base import trainer_forward

    case = CASES[case_name]
    results = {}
    for name, hf_dir in models.items():
        batch = batches[name]
        inputs = batch["inputs"]
        ckpt = os.path.join(out_root, name)
        convert_rank(plan_hf_to_megatron(hf_dir), ckpt)
        policy, meta = build_policy_from_checkpoint(ckpt)
        policy.eval()
        family = family_by_name(meta.family)
        reader = HFCheckpointReader(hf_dir, family.hf_aliases)
        exported = dict(export_hf_tensors(policy, family, meta.hf_config))
        not_identical = [n for n, t in exported.items()
                         if n not in reader or t.dtype != reader.get(n).dtype or not torch.equal(t, reader.get(n))]
        vocab = meta.vocab_size
        with torch.no_grad():
            logits = policy(**inputs)
            masked = policy(**inputs, attention_mask=batch["attention_mask"])
            loss = policy(**inputs, labels=batch["labels"])
            mb = {"tokens": inputs["input_ids"], **{k: v for k, v in inputs.items() if k != "input_ids"}}
            via_trainer = trainer_forward(policy, mb)
        res = {"ckpt": ckpt, "family": meta.family, "vocab": vocab, "padded_vocab": meta.padded_vocab_size,
               "tied": bool(family.decoder_dims(meta.hf_config).tie_word_embeddings), "tied_head": family.tied_head,
               "logits": logits[..., :vocab].clone(), "pad_logits": logits[..., vocab:].clone(),
               "masked_logits": masked[..., :vocab].clone(), "loss": float(loss.sum()),
               "trainer_forward_equal": torch.equal(via_trainer, logits),
               "hf_names": sorted(reader.names()), "exported": sorted(exported), "not_identical": not_identical,
               "decode": _decode(policy, batch, case.n_new),
               "masked_decode": _decode(policy, batch, case.n_new, attention_mask=batch["attention_mask"])}
        reader.close()
        if case.tp1_extra:
            res.update(globals()[case.tp1_extra](policy, meta, batch, name, ckpt, out_root))
        results[name] = res
    return results


def tp2_worker(case_name, ckpts, batches, models, out_root):
    from megatron.core import parallel_state

    from megatron_rcpa.convert.checkpoint import build_policy_from_checkpoint
    from megatron_rcpa.models.inference import gather_vocab_logits

    case = CASES[case_name]
    out = {"tp_rank": parallel_state.get_tensor_model_parallel_rank()}
    for name, ckpt in ckpts.items():
        batch = batches[name]
        policy, meta = build_policy_from_checkpoint(ckpt)
        policy.eval()
        with torch.no_grad():
            local = policy(**batch["inputs"])
            loss = policy(**batch["inputs"], labels=batch["labels"])
        res = {"local_vocab": local.shape[-1], "logits": gather_vocab_logits(local, meta.vocab_size),
               "loss": float(loss.sum()), "decode": _decode(policy, batch, case.n_new)}
        if case.tp2_extra:
            res.update(globals()[case.tp2_extra](policy, meta, batch, name))
        out[name] = res
    if case.tp2_once:
        out.update(globals()[case.tp2_once](ckpts, batches, models, out_root))
    return out


def pp2_worker(case_name, ckpts, batches):
    from megatron_rcpa.convert.checkpoint import build_policy_from_checkpoint
    from megatron_rcpa.convert.families import family_by_name
    from megatron_rcpa.convert.megatron_to_hf import export_hf_tensors
    from megatron_rcpa.models.inference import pipeline_greedy_generate
    from megatron_rcpa.models.pipeline import pipeline_forward

    case = CASES[case_name]
    out = {}
    for name, ckpt in ckpts.items():
        inputs = batches[name]["inputs"]
        ids = inputs["input_ids"]
        policy, meta = build_policy_from_checkpoint(ckpt)
        policy.eval()
        outputs = pipeline_forward(policy, [inputs], seq_length=ids.shape[1], micro_batch_size=ids.shape[0])
        out[name] = {"logits": outputs[0][..., : meta.vocab_size] if outputs is not None else None,
                     "has_vision": getattr(policy, "vision_model", None) is not None,
                     "num_layers_here": len(policy.language_model.decoder.layers),
                     "decode": pipeline_greedy_generate(policy, **inputs, max_new_tokens=case.n_new,
                                                        return_logits=True),
                     # this stage's tensors
                     "exported": dict(export_hf_tensors(policy, family_by_name(meta.family), meta.hf_config))}
    return out


# --------------------------------------------------------------------------- family-specific hooks
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


def qwen_tp1_extra(policy, meta, batch, name, ckpt, out_root) -> dict:
    """``untied``: an interrupted save leaves no checkpoint; a policy of another padded vocabulary is refused."""
    from megatron_rcpa.convert.checkpoint import load_checkpoint
    from megatron_rcpa.convert.errors import ConversionError
    from megatron_rcpa.convert.families import family_by_name

    if name != "untied":
        return {}
    res = {"atomic": _failed_save_leaves_no_checkpoint(policy, meta, out_root)}
    wrong = family_by_name(meta.family).build_policy(meta.hf_config, padded_vocab_size=512,
                                                     perform_initialization=False)
    try:
        load_checkpoint(wrong, ckpt)
        res["vocab_mismatch"] = ""
    except ConversionError as exc:
        res["vocab_mismatch"] = str(exc)
    return res


def qwen_tp2_extra(policy, meta, batch, name) -> dict:
    """Gathered logits, ``loss_fn`` == ``labels``, and the replicated vision tower's gradients averaged over TP."""
    from megatron.core import tensor_parallel

    from megatron_rcpa.models.qwen2_5_vl import allreduce_vision_grads

    inputs = batch["inputs"]
    with torch.no_grad():
        local = policy(**inputs)
        gathered = policy(**inputs, runtime_gather_output=True)

        def per_token_ce(vocab_parallel_logits):
            return tensor_parallel.vocab_parallel_cross_entropy(vocab_parallel_logits.float(), batch["labels"])

        via_loss_fn = policy(**inputs, loss_fn=per_token_ce)
        via_labels = policy(**inputs, labels=batch["labels"])
    from megatron_rcpa.models.inference import gather_vocab_logits

    out = {"gathered_equal": torch.equal(gathered[..., : meta.vocab_size], gather_vocab_logits(local, meta.vocab_size)),
           "gathered_width": gathered.shape[-1], "loss_fn_equal": torch.equal(via_loss_fn, via_labels)}
    policy.train()
    loss = policy(**inputs, labels=batch["labels"]).sum()
    loss.backward()
    allreduce_vision_grads(policy)
    out["grad_loss"] = float(loss)
    out["vision_grads"] = {n: p.grad.clone() for n, p in policy.vision_model.named_parameters()}
    out["tagged"] = all(getattr(p, "average_gradients_across_tp_domain", False)
                        for p in policy.vision_model.parameters())
    policy.zero_grad(set_to_none=True)
    policy.eval()
    return out


def qwen_tp2_once(ckpts, batches, models, out_root) -> dict:
    """A conversion run on the TP=2 grid (its checkpoint is loaded at PP=2 later)."""
    from megatron_rcpa.convert.hf_to_megatron import convert_rank, plan_hf_to_megatron

    converted_here = os.path.join(out_root, "untied_converted_at_tp2")
    convert_rank(plan_hf_to_megatron(models["untied"], tp=2), converted_here)
    return {"converted_here": converted_here}


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


def _llava_grads(policy, meta, batch) -> dict:
    from megatron_rcpa.convert.families import family_by_name

    policy.zero_grad()
    loss = policy(**batch["inputs"], labels=batch["labels"]).sum()
    loss.backward()
    grads = _hf_named_grads(policy, family_by_name(meta.family), meta.hf_config)
    policy.zero_grad(set_to_none=True)
    return {"grad_loss": float(loss.detach()), "grads": grads}


def llava_tp1_extra(policy, meta, batch, name, ckpt, out_root) -> dict:
    ids, pv = batch["inputs"]["input_ids"], batch["inputs"]["pixel_values"]
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
    out = _llava_grads(policy, meta, batch)
    out.update({"errors": errors,
                "unused_buffers": sorted(n for n, _ in policy.named_buffers() if n.startswith("vision_unused.")),
                "vision_layers": len(policy.vision_model.decoder.layers)})
    return out


def llava_tp2_extra(policy, meta, batch, name) -> dict:
    out = _llava_grads(policy, meta, batch)
    out["vision_qkv_rows"] = policy.vision_model.decoder.layers[0].self_attention.linear_qkv.weight.shape[0]
    return out


def llava_tp2_once(ckpts, batches, models, out_root) -> dict:
    """The training interfaces on a fresh policy: RolloutEngine rollouts (KV cache, left padding) from two
    image prompts, their log-probs recomputed through the PP schedule (right padding), one RCPA train_step
    with megatron DDP + optimizer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_rcpa.algo.config import LossConfig
    from megatron_rcpa.convert.checkpoint import build_policy_from_checkpoint
    from megatron_rcpa.models.policy_base import trainer_forward
    from megatron_rcpa.rollout.batch import pack_rollouts
    from megatron_rcpa.rollout.engine import PromptInput, RolloutEngine, SamplingParams
    from megatron_rcpa.rollout.sampling import StopChecker
    from megatron_rcpa.train.step import StepConfig, compute_logprobs, split_micro_batches, train_step

    batch = batches["clip_llama"]
    policy, meta = build_policy_from_checkpoint(ckpts["clip_llama"])
    ids, pv = batch["inputs"]["input_ids"], batch["inputs"]["pixel_values"]
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
    return {"train": {"generated": sum(len(r.generated_tokens) for r in rollouts), "logp_mismatch": mismatch,
                      "metrics": metrics, "vit_qkv_moved": (qkv.detach() - before).abs().max().item(),
                      "ln_pre": policy.vision_model.ln_pre.weight.detach().clone()}}


def text_tp1_extra(policy, meta, batch, name, ckpt, out_root) -> dict:
    ids = batch["inputs"]["input_ids"]
    errors = {}
    for what, kwargs in (("pixels", {"pixel_values": torch.zeros(4, 8)}),
                         ("positions", {"position_ids": torch.zeros_like(ids)})):
        try:
            policy(input_ids=ids, **kwargs)
        except ValueError as exc:
            errors[what] = str(exc)
    return {"errors": errors}


# ------------------------------------------------------------------------------------ the harness
class Harness:
    """Per family, computed once per session on first use: the saved models, batches, HF models and
    references, and the TP1 / TP2 / PP2 spawn results."""

    def __init__(self, tmp_path_factory) -> None:
        self._tmp = tmp_path_factory
        self._cache: Dict[Tuple[str, str], Any] = {}

    def _get(self, what: str, case: str, make: Callable[[], Any]):
        key = (what, case)
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def models(self, case: str) -> Dict[str, str]:
        return self._get("models", case, lambda: save_case_models(CASES[case], str(self._tmp.mktemp(case))))

    def batches(self, case: str) -> Dict[str, dict]:
        return self._get("batches", case, lambda: CASES[case].batches(self.models(case)))

    def hf_models(self, case: str) -> Dict[str, Any]:
        return self._get("hf_models", case, lambda: {n: load_hf_model(p) for n, p in self.models(case).items()})

    def reference(self, case: str) -> Dict[str, dict]:
        def make():
            hf, batches = self.hf_models(case), self.batches(case)
            return {n: hf_reference(m, batches[n], CASES[case].hf_extra, n) for n, m in hf.items()}

        return self._get("reference", case, make)

    def tp1(self, case: str) -> Dict[str, dict]:
        from megatron_rcpa.testing.launcher import run_distributed

        def make():
            out_root = str(self._tmp.mktemp(f"{case}_ckpts"))
            return run_distributed(tp1_worker, world_size=1, args=(case, self.models(case), out_root,
                                                                     self.batches(case)), timeout=300)[0]

        return self._get("tp1", case, make)

    def tp2(self, case: str) -> list:
        """The TP=2 spawn on the TP1-converted checkpoints (both ranks' results)."""
        from megatron_rcpa.testing.launcher import run_distributed

        def make():
            tp1 = self.tp1(case)
            ckpts = {n: tp1[n]["ckpt"] for n in CASES[case].tp2_models}
            out_root = os.path.dirname(next(iter(ckpts.values())))
            return run_distributed(tp2_worker, world_size=2, tp=2,
                                   args=(case, ckpts, self.batches(case), self.models(case), out_root), timeout=300)

        return self._get("tp2", case, make)

    def pp2_ckpts(self, case: str) -> Dict[str, Tuple[str, str]]:
        """name -> (checkpoint, the model it holds): every TP1 checkpoint, plus ``Case.pp2_from_tp2`` (a
        checkpoint converted on another grid, loaded at PP=2)."""
        out = {n: (r["ckpt"], n) for n, r in self.tp1(case).items()}
        if CASES[case].pp2_from_tp2 is not None:
            name, key, model = CASES[case].pp2_from_tp2
            out[name] = (self.tp2(case)[0][key], model)
        return out

    def pp2(self, case: str) -> Tuple[dict, dict]:
        from megatron_rcpa.testing.launcher import run_distributed

        def make():
            ckpts = self.pp2_ckpts(case)
            batches = {n: self.batches(case)[model] for n, (_, model) in ckpts.items()}
            first, last = run_distributed(pp2_worker, world_size=2, pp=2,
                                          args=(case, {n: c for n, (c, _) in ckpts.items()}, batches), timeout=300)
            return first, last

        return self._get("pp2", case, make)


def check_decode(tokens, logits, hf_model, batch, attention_mask=None):
    """Cached greedy decoding == argmax of full HF forwards over prompt + generated tokens (Qwen2.5-VL: the
    3-D positions of the new tokens continue from the prompt's largest position + 1, as transformers'
    rope_deltas do)."""
    prompt = batch["inputs"]["input_ids"]
    full = torch.cat([prompt, tokens], dim=1)
    mask = None if attention_mask is None else torch.cat([attention_mask, torch.ones_like(tokens)], dim=1)
    with torch.no_grad():
        ref = hf_forward(hf_model, batch, input_ids=full, attention_mask=mask)[:, prompt.shape[1] - 1: -1]
    if logits is not None:
        assert (logits - ref).abs().max().item() <= ATOL
    assert torch.equal(ref.argmax(-1), tokens)
