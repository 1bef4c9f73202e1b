"""One RCPA optimisation step on a Megatron-Core policy, through megatron's pipeline schedule.

    rollouts (RolloutBatch) -> fixed-shape micro-batches -> forward_backward_func
        -> last stage: vocab-parallel logits -> ops.rcpa_loss_from_logits (fused kernels, TP-aware)
    -> DDP grad reduction -> optimizer step (with grad clipping)

Normalisation is global (RCPA_SPEC section 4): the token / sequence / imitation counts of the whole batch
over every micro-batch and data-parallel rank are computed first (:func:`global_counts`) and every
micro-batch's loss is divided by them, so the micro-batch losses SUM to the batch loss. Megatron's schedule
divides each micro-batch loss by the number of micro-batches and DDP averages gradients over data-parallel
ranks; the loss handed to backward is multiplied by both so the gradient is that of the batch loss. A prompt's
rollouts may span micro-batches: the imitation term's per-token weights are computed over all of them
(:func:`batch_imitation_weights`) and handed to each micro-batch's loss.

Forward-only passes (:func:`compute_logprobs`) give the old-policy and reference log-probs on the last
pipeline stage, the only stage that computes the loss.

The model's forward is ``model(tokens [b, s], position_ids [b, s], attention_mask=None) -> logits
[b, s, V/TP]`` (megatron GPTModel with ``parallel_output=True``); other policies adapt to it with
``forward_fn``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional

import torch

from megatron_rcpa.algo.config import LossConfig
from megatron_rcpa.algo.loss import GlobalCounts, count_tokens
from megatron_rcpa.rollout.batch import RolloutBatch

ForwardFn = Callable[[torch.nn.Module, Dict[str, torch.Tensor]], torch.Tensor]


def default_forward(model: torch.nn.Module, mb: Dict[str, torch.Tensor]) -> torch.Tensor:
    b, s = mb["tokens"].shape
    position_ids = torch.arange(s, device=mb["tokens"].device).expand(b, s)
    return model(mb["tokens"], position_ids, None)


def split_micro_batches(batch: RolloutBatch, micro_batch_size: int,
                        group_size: Optional[int] = None) -> List[RolloutBatch]:
    """Fixed-shape micro-batches (pipeline parallelism needs one shape) of ``micro_batch_size`` consecutive
    rollouts. A prompt's rollouts may span micro-batches: :func:`train_step` weights the imitation term over
    all the micro-batches it is given (:func:`batch_imitation_weights`). ``group_size`` is accepted for
    callers of the former API (micro-batches had to hold whole groups) and no longer constrains the split."""
    n = batch.num_rollouts
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"optim.micro_batch_size = {micro_batch_size!r}: expected an integer >= 1")
    if n % micro_batch_size:
        raise ValueError(f"{n} rollouts per rank do not split into micro-batches of {micro_batch_size}")
    return [batch.select(range(i, i + micro_batch_size)) for i in range(0, n, micro_batch_size)]


def batch_imitation_weights(micro_batches: List[RolloutBatch]) -> List[torch.Tensor]:
    """Per micro-batch, each constrained token's imitation weight [b, s] (float64) over ALL the micro-batches:
    1 / (number of rollouts of its prompt holding a constrained token in the whole list), 0 elsewhere
    (``algo.loss.imitation_weights`` counts only one loss call's rollouts). A rollout is a row of one
    micro-batch (``seq_ids`` are per micro-batch: length buckets pack each one on its own); prompts are
    matched by ``prompt_ids`` across micro-batches. Where every micro-batch holds its prompts' rollouts whole,
    the weights equal ``imitation_weights`` of each micro-batch exactly."""
    per_mb = []
    for mb in micro_batches:
        cons = mb.constrained_mask.reshape(-1).bool()
        sids, pids = mb.seq_ids.reshape(-1), mb.prompt_ids.reshape(-1)
        # the (rollout, prompt) pairs of this micro-batch's rollouts that hold a constrained token
        pairs = torch.unique(torch.stack([sids[cons], pids[cons]], dim=1), dim=0) if bool(cons.any()) else None
        per_mb.append((cons, pids, pairs))
    held = [p[:, 1] for _, _, p in per_mb if p is not None]
    if not held:
        return [torch.zeros(mb.constrained_mask.shape, dtype=torch.float64) for mb in micro_batches]
    prompts, rollouts = torch.unique(torch.cat(held), return_counts=True)
    out = []
    for mb, (cons, pids, _) in zip(micro_batches, per_mb):
        w = torch.zeros(cons.shape, dtype=torch.float64)
        if bool(cons.any()):
            n = rollouts[torch.searchsorted(prompts, pids[cons])].to(torch.float64)
            w[cons] = 1.0 / n.clamp_min(1.0)
        out.append(w.view(mb.constrained_mask.shape))
    return out


def resolve_groups(groups=None):
    """The process groups to use: ``groups`` when given, else read from megatron's parallel state (once, here)."""
    if groups is not None:
        return groups
    from megatron_rcpa.runtime.parallel import ParallelGroups

    return ParallelGroups.from_parallel_state()


def global_counts(micro_batches: List[RolloutBatch], dp_group=None,
                  imitation: Optional[List[torch.Tensor]] = None) -> GlobalCounts:
    """The normalisers of the whole batch: summed over micro-batches, all-reduced over data parallel.
    ``imitation``: :func:`batch_imitation_weights` of the micro-batches (the imitation count is their sum;
    default: each micro-batch's own weights, right only when it holds its prompts' rollouts whole)."""
    total = GlobalCounts(0.0, 0.0, 0.0)
    for i, mb in enumerate(micro_batches):
        c = count_tokens(mb.gen_mask, mb.constrained_mask, mb.seq_ids, mb.prompt_ids)
        if imitation is not None:
            c = GlobalCounts(c.num_gen_tokens, c.num_seqs, float(imitation[i].sum()))
        total = total + c
    return total.all_reduce(dp_group)


def _as_dict(mb: RolloutBatch, extra: Optional[Dict[str, torch.Tensor]], device) -> Dict[str, torch.Tensor]:
    d = {k: v.to(device) for k, v in mb.__dict__.items()}
    for k, v in (extra or {}).items():
        d[k] = v.to(device)
    return d


@dataclass
class StepConfig:
    loss: LossConfig
    lambda_t: float = 0.0
    temperature: float = 1.0
    vocab_size: Optional[int] = None  # the real vocabulary; Megatron's padded columns are excluded
    impl: str = "triton"  # the fused kernels; "torch" = the plain reference path


def _loss_func(cfg: StepConfig, counts: GlobalCounts, scale: float, tp_group, mb: Dict[str, torch.Tensor],
               output_tensor: torch.Tensor):
    from megatron_rcpa.ops import masked_logprob, rcpa_loss_from_logits

    old_logp = mb.get("old_logp")
    extra: Dict[str, torch.Tensor] = {}
    if old_logp is None:
        # one update per step: the old policy IS the current one, so its log-probs are this forward's, detached
        # (the ratio is exactly 1 and the clipped objective's gradient is A * grad log p); no second forward
        mask = mb["gen_mask"] | mb["constrained_mask"]
        old_logp = masked_logprob(output_tensor.detach(), mb["targets"], mask, temperature=cfg.temperature,
                                  tp_group=tp_group, vocab_size=cfg.vocab_size, impl=cfg.impl).detach()
        gen = mb["gen_mask"]
        diff = ((old_logp.float() - mb["rollout_logp"].float()).abs() * gen).sum()
        extra["logp_mismatch"] = diff / max(counts.num_gen_tokens, 1.0)  # summed over micro-batches and DP
    loss, metrics = rcpa_loss_from_logits(
        output_tensor, mb["targets"], old_logp, mb["advantages"], mb["gen_mask"], config=cfg.loss,
        ref_logp=mb.get("ref_logp"), constrained_mask=mb["constrained_mask"], seq_ids=mb["seq_ids"],
        prompt_ids=mb["prompt_ids"], lambda_t=cfg.lambda_t, counts=counts, temperature=cfg.temperature,
        vocab_size=cfg.vocab_size, tp_group=tp_group, impl=cfg.impl, imitation_weight=mb.get("imitation_weight"))
    metrics.update(extra)
    return loss * scale, metrics


def _logprob_func(cfg: StepConfig, tp_group, mb: Dict[str, torch.Tensor], output_tensor: torch.Tensor):
    from megatron_rcpa.ops import masked_logprob

    mask = mb["gen_mask"] | mb["constrained_mask"]
    logp = masked_logprob(output_tensor, mb["targets"], mask, temperature=cfg.temperature, tp_group=tp_group,
                          vocab_size=cfg.vocab_size, impl=cfg.impl)
    return output_tensor.new_zeros(()), {"logp": logp.detach()}


def _forward_step(loss_factory, forward_fn: ForwardFn, data_iterator, model):
    mb = next(data_iterator)
    return forward_fn(model, mb), partial(loss_factory, mb)


def _run_schedule(model, micro: List[Dict[str, torch.Tensor]], loss_factory, forward_fn: ForwardFn,
                  forward_only: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rcpa.models.parallel_knobs import sequence_parallel_length

    b, s = micro[0]["tokens"].shape
    config = getattr(model, "config", None)
    if config is not None:  # with sequence parallelism the policy pads to a multiple of TP: stage messages too
        s = sequence_parallel_length(config, s)
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, loss_factory, forward_fn), data_iterator=iter(micro),
        model=[model], num_microbatches=len(micro), seq_length=s, micro_batch_size=b, forward_only=forward_only)


def compute_logprobs(model, micro_batches: List[RolloutBatch], cfg: StepConfig,
                     forward_fn: ForwardFn = default_forward,
                     extras: Optional[List[Dict[str, torch.Tensor]]] = None,
                     groups=None) -> Optional[List[torch.Tensor]]:
    """Per-token log-probs ``[b, s]`` of every micro-batch's targets (0 off the loss positions), without
    gradients. Returned on the last pipeline stage; None on the others. ``extras[i]`` (e.g. the rows'
    images) is added to micro-batch i's inputs. ``groups``: the process groups (default: megatron's)."""
    groups = resolve_groups(groups)
    device = next(model.parameters()).device
    micro = [_as_dict(mb, extras[i] if extras else None, device) for i, mb in enumerate(micro_batches)]
    with torch.no_grad():
        out = _run_schedule(model, micro, partial(_logprob_func, cfg, groups.tp_group), forward_fn, True)
    if not groups.is_last_stage:
        return None
    return [o["logp"] for o in out]


def train_step(model, optimizer, micro_batches: List[RolloutBatch], old_logp: Optional[List[torch.Tensor]],
               cfg: StepConfig, ref_logp: Optional[List[torch.Tensor]] = None,
               forward_fn: ForwardFn = default_forward,
               extras: Optional[List[Dict[str, torch.Tensor]]] = None, groups=None) -> Dict[str, float]:
    """Forward+backward over all micro-batches and one optimizer step. ``model`` is megatron's DDP-wrapped
    policy and ``optimizer`` from ``get_megatron_optimizer``; ``groups`` the process groups (default:
    megatron's). Returns the batch metrics (summed over micro-batches and data-parallel ranks, i.e. global
    means) plus grad_norm / update_ok on every rank. ``old_logp`` None: the old policy is the current one
    (a single update per step); its log-probs come from this forward, detached, and ``logp_mismatch`` (the
    rollout's sampled log-probs against them) is among the metrics."""
    groups = resolve_groups(groups)
    device = next(model.parameters()).device
    dp_group, dp_size = groups.dp_group, groups.dp_size
    imitation = batch_imitation_weights(micro_batches)  # a prompt's rollouts may span micro-batches
    counts = global_counts(micro_batches, dp_group, imitation)
    last = groups.is_last_stage
    micro = []
    for i, mb in enumerate(micro_batches):
        extra = dict(extras[i]) if extras else {}
        if last:
            extra["imitation_weight"] = imitation[i]
        if last and old_logp is not None:  # only the last stage reads the per-token inputs of the loss
            extra["old_logp"] = old_logp[i]
        if last and ref_logp is not None:
            extra["ref_logp"] = ref_logp[i]
        micro.append(_as_dict(mb, extra, device))
    scale = float(len(micro) * dp_size)
    factory = partial(_loss_func, cfg, counts, scale, groups.tp_group)
    model.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = _run_schedule(model, micro, factory, forward_fn, False)
    update_ok, grad_norm, _ = optimizer.step()

    metrics: Dict[str, float] = {}
    keys = sorted(outputs[0]) if last and outputs else []
    # every rank joins the same reductions: last-stage ranks hold values, others zeros, summed over PP too
    names = _broadcast_keys(keys, groups)
    vec = torch.zeros(len(names), dtype=torch.float64, device=device)
    if last:
        for o in outputs:
            vec += torch.stack([o[k].detach().to(device=device, dtype=torch.float64).reshape(()) for k in names])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(vec, group=dp_group)
        if groups.pp_size > 1:
            torch.distributed.all_reduce(vec, group=groups.pp_group)
    metrics.update({k: float(v) for k, v in zip(names, vec.cpu().tolist())})
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["update_ok"] = float(bool(update_ok))
    return metrics


def _broadcast_keys(keys: List[str], groups) -> List[str]:
    """The metric names from the last pipeline stage, known on every rank."""
    if groups.pp_size == 1:
        return keys
    obj = [keys]
    torch.distributed.broadcast_object_list(obj, src=groups.pp_last_rank, group=groups.pp_group)
    return obj[0]
