"""The RCPA loss (RCPA_SPEC section 4), the plain-torch reference every kernel is tested against.

    L = L_pg(O) + beta * L_kl(O) - alpha * H(O) + lambda_t * L_imit(C)

All inputs are per-token tensors of one shape (packed ``[T]``, Megatron's ``[S, B]``, ...):

- ``logp``       log pi(token) under the current policy (differentiable)
- ``old_logp``   log pi_old(token) from the rollout policy
- ``ref_logp``   log pi_ref(token) from the frozen reference (needed when beta > 0)
- ``entropy``    policy entropy at the position (needed when alpha > 0)
- ``advantages`` the rollout's advantage, broadcast to its tokens
- ``gen_mask``   True on generated tokens O (the policy-gradient set)
- ``constrained_mask`` True on the forced prefix tokens C (the imitation set)
- ``seq_ids``    rollout id per token (sequence-level ratio and the seq_* aggregations need it)
- ``prompt_ids`` prompt id per token: a prompt's G rollouts share the prefix, which is counted once

Normalisation is global: pass ``counts`` (from :func:`count_tokens`, summed over all micro-batches and
data-parallel ranks) so that summing the per-micro-batch losses gives the loss of the whole batch. Every
returned metric is normalised the same way, so metrics also sum across micro-batches and ranks.
A prompt's rollouts must lie in the same call for the imitation term to count its prefix once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from .config import LossConfig
from .registry import (
    AGG_PER_TOKEN,
    AGG_UNIFORM,
    AGGREGATIONS,
    KL_ESTIMATORS,
    register_aggregation,
    register_kl_estimator,
)

Tensor = torch.Tensor


@dataclass
class GlobalCounts:
    """Normalisers of the aggregation: generated tokens, rollouts with a generated token, and
    constrained tokens counted once per prompt."""

    num_gen_tokens: float
    num_seqs: float
    num_imit_tokens: float

    def __add__(self, other: GlobalCounts) -> GlobalCounts:
        return GlobalCounts(self.num_gen_tokens + other.num_gen_tokens, self.num_seqs + other.num_seqs,
                            self.num_imit_tokens + other.num_imit_tokens)

    def all_reduce(self, group=None) -> GlobalCounts:
        """Sum over the ranks of ``group`` (torch.distributed; e.g. the data-parallel group)."""
        import torch.distributed as dist

        t = torch.tensor([self.num_gen_tokens, self.num_seqs, self.num_imit_tokens], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend(group) == "nccl":
                t = t.cuda()
            dist.all_reduce(t, group=group)
        a, b, c = t.tolist()
        return GlobalCounts(a, b, c)


def _flat(x: Optional[Tensor], shape, name: str) -> Optional[Tensor]:
    if x is None:
        return None
    if x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)} (the shape of logp)")
    return x.reshape(-1)


def _dense_ids(ids: Tensor) -> Tuple[Tensor, int]:
    uniq, inv = torch.unique(ids, return_inverse=True)
    return inv, int(uniq.numel())


def imitation_weights(constrained: Tensor, seq_ids: Optional[Tensor], prompt_ids: Optional[Tensor]) -> Tensor:
    """Weight of each constrained token: 1 / (number of rollouts of its prompt holding a constrained token),
    so that a prefix shared by a group counts once. Flat float64 tensors; 0 off the constrained set."""
    w = constrained.to(torch.float64)
    if prompt_ids is None or not bool(constrained.any()):
        return w
    if seq_ids is None:
        raise ValueError("prompt_ids given without seq_ids: the imitation term needs both to count a prefix once")
    pidx, npr = _dense_ids(prompt_ids)
    sidx, nseq = _dense_ids(seq_ids)
    has_c = torch.zeros(nseq, dtype=torch.bool, device=w.device)
    has_c[sidx[constrained]] = True
    seq_prompt = torch.zeros(nseq, dtype=torch.long, device=w.device)
    seq_prompt[sidx] = pidx
    rollouts = torch.zeros(npr, dtype=torch.float64, device=w.device).index_add_(
        0, seq_prompt[has_c], torch.ones(int(has_c.sum()), dtype=torch.float64, device=w.device))
    return torch.where(constrained, 1.0 / rollouts[pidx].clamp_min(1.0), torch.zeros_like(w))


def count_tokens(gen_mask: Tensor, constrained_mask: Optional[Tensor] = None, seq_ids: Optional[Tensor] = None,
                 prompt_ids: Optional[Tensor] = None) -> GlobalCounts:
    """Local counts; sum them over micro-batches and ``all_reduce`` over data-parallel ranks."""
    gen = gen_mask.reshape(-1).bool()
    num_seqs = 0.0
    if seq_ids is not None:
        num_seqs = float(torch.unique(seq_ids.reshape(-1)[gen]).numel())
    num_imit = 0.0
    if constrained_mask is not None:
        c = constrained_mask.reshape(-1).bool()
        num_imit = float(imitation_weights(c, None if seq_ids is None else seq_ids.reshape(-1),
                                           None if prompt_ids is None else prompt_ids.reshape(-1)).sum())
    return GlobalCounts(float(gen.sum()), num_seqs, num_imit)


@register_kl_estimator("k1", kernel_id=1)
def _kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return logp - ref_logp


@register_kl_estimator("k2", kernel_id=2)
def _kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    d = ref_logp - logp
    return 0.5 * d * d


@register_kl_estimator("k3", kernel_id=3)
def _kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    d = ref_logp - logp
    return torch.expm1(d) - d


def kl_penalty(logp: Tensor, ref_logp: Tensor, kl_type: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1, k2, k3; the names are
    ``registry.KL_ESTIMATORS``)."""
    return KL_ESTIMATORS.get(kl_type).reference(logp, ref_logp)


@register_aggregation("token_mean", kernel_id=AGG_UNIFORM,
                      kernel_scale=lambda config, counts: 1.0 / max(counts.num_gen_tokens, 1.0))
def _token_mean(g: Tensor, seq_idx: Optional[Tensor], nseq: int, config: LossConfig, counts: GlobalCounts) -> Tensor:
    """DAPO: every generated token of the batch weighs the same."""
    return g / max(counts.num_gen_tokens, 1.0)


@register_aggregation("seq_mean_token_mean", kernel_id=AGG_PER_TOKEN, needs_seq_ids=True)
def _seq_mean_token_mean(g: Tensor, seq_idx: Optional[Tensor], nseq: int, config: LossConfig,
                         counts: GlobalCounts) -> Tensor:
    """Original GRPO: mean over each rollout's tokens, then over the rollouts."""
    per_seq = torch.zeros(nseq, dtype=torch.float64, device=g.device).index_add_(0, seq_idx, g)
    return g / per_seq[seq_idx].clamp_min(1.0) / max(counts.num_seqs, 1.0)


@register_aggregation("seq_mean_token_sum_norm", kernel_id=AGG_UNIFORM, needs_seq_ids=True,
                      needs_max_response_length=True,
                      kernel_scale=lambda config, counts: (1.0 / float(config.max_response_length)
                                                           / max(counts.num_seqs, 1.0)))
def _seq_mean_token_sum_norm(g: Tensor, seq_idx: Optional[Tensor], nseq: int, config: LossConfig,
                             counts: GlobalCounts) -> Tensor:
    """Dr.GRPO: each rollout's token sum divided by a fixed length, then the mean over the rollouts."""
    return g / float(config.max_response_length) / max(counts.num_seqs, 1.0)


def token_weights(gen: Tensor, seq_idx: Optional[Tensor], nseq: int, config: LossConfig,
                  counts: GlobalCounts) -> Tensor:
    """Aggregation weight of each generated token (float64, 0 elsewhere): the loss is sum(w * term)."""
    agg = AGGREGATIONS.get(config.aggregation)
    if agg.needs_seq_ids and seq_idx is None:
        raise ValueError(f"aggregation = {config.aggregation!r} needs seq_ids")
    return agg.reference(gen.to(torch.float64), seq_idx, nseq, config, counts)


def rcpa_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    gen_mask: Tensor,
    *,
    config: LossConfig,
    ref_logp: Optional[Tensor] = None,
    entropy: Optional[Tensor] = None,
    constrained_mask: Optional[Tensor] = None,
    seq_ids: Optional[Tensor] = None,
    prompt_ids: Optional[Tensor] = None,
    lambda_t: float = 0.0,
    counts: Optional[GlobalCounts] = None,
    imitation_weight: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The RCPA loss and its metrics (see the module docstring). Returns (loss, metrics); the loss is a
    0-dim tensor in logp's dtype, differentiable w.r.t. logp (and entropy); metrics are detached.

    ``imitation_weight`` (optional, logp's shape): each constrained token's weight computed over a larger
    batch than this call's (a micro-batch holding only some of a prompt's rollouts); default
    :func:`imitation_weights` of this call's tokens."""
    shape = logp.shape
    old = _flat(old_logp, shape, "old_logp")
    adv = _flat(advantages, shape, "advantages")
    gen = _flat(gen_mask, shape, "gen_mask").bool()
    ref = _flat(ref_logp, shape, "ref_logp")
    ent = _flat(entropy, shape, "entropy")
    cons = _flat(constrained_mask, shape, "constrained_mask")
    sids = _flat(seq_ids, shape, "seq_ids")
    pids = _flat(prompt_ids, shape, "prompt_ids")
    given_iw = _flat(imitation_weight, shape, "imitation_weight")
    lp = logp.reshape(-1)
    if config.beta > 0 and ref is None:
        raise ValueError(f"LossConfig.beta = {config.beta} > 0 needs ref_logp")
    if config.alpha > 0 and ent is None:
        raise ValueError(f"LossConfig.alpha = {config.alpha} > 0 needs entropy")
    if lambda_t < 0:
        raise ValueError(f"lambda_t = {lambda_t} must be >= 0")
    if cons is not None:
        cons = cons.bool()
        if bool((cons & gen).any()):
            raise ValueError("gen_mask and constrained_mask overlap: a token is either forced or generated")
    if counts is None:
        counts = count_tokens(gen, cons, sids, pids)
        if given_iw is not None and cons is not None:
            counts = GlobalCounts(counts.num_gen_tokens, counts.num_seqs, float(given_iw.double()[cons].sum()))

    seq_idx, nseq = _dense_ids(sids) if sids is not None else (None, 0)
    zero = torch.zeros_like(lp)
    log_ratio = token_log_ratio = torch.where(gen, lp - old, zero)
    if config.ratio_level == "sequence":
        if seq_idx is None:
            raise ValueError("ratio_level = 'sequence' needs seq_ids")
        g = gen.to(lp.dtype)
        seq_sum = torch.zeros(nseq, dtype=lp.dtype, device=lp.device).index_add(0, seq_idx, log_ratio)
        seq_len = torch.zeros(nseq, dtype=lp.dtype, device=lp.device).index_add(0, seq_idx, g)
        log_ratio = torch.where(gen, (seq_sum / seq_len.clamp_min(1.0))[seq_idx], zero)
    ratio = torch.exp(log_ratio)
    a = torch.where(gen, adv.to(lp.dtype), zero)
    clipped = ratio.clamp(1.0 - config.eps_low, 1.0 + config.eps_high)
    pg = torch.maximum(-a * ratio, -a * clipped)
    if config.dual_clip is not None:
        pg = torch.where(a < 0, torch.minimum(pg, -a * config.dual_clip), pg)

    term = pg
    kl = None
    if ref is not None:
        # mask the inputs first: garbage at masked positions must not reach a backward of exp
        kl = torch.where(gen, kl_penalty(torch.where(gen, lp, zero), torch.where(gen, ref.to(lp.dtype), zero),
                                         config.kl_type), zero)
        if config.beta > 0:
            term = term + config.beta * kl
    ent_g = torch.where(gen, ent.to(lp.dtype), zero) if ent is not None else None
    if config.alpha > 0:
        term = term - config.alpha * ent_g

    w = token_weights(gen, seq_idx, nseq, config, counts).to(lp.dtype)
    agg = (w * term).sum()
    imit = lp.new_zeros(())
    if cons is not None:
        base = imitation_weights(cons, sids, pids) if given_iw is None else torch.where(cons, given_iw.double(), 0.0)
        iw = base.to(lp.dtype) / max(counts.num_imit_tokens, 1.0)
        imit = -(iw * torch.where(cons, lp, zero)).sum()
    loss = agg + lambda_t * imit

    with torch.no_grad():
        tm = gen.to(lp.dtype) / max(counts.num_gen_tokens, 1.0)  # token-mean weights for the metrics
        low = gen & (a < 0) & (ratio < 1.0 - config.eps_low)
        high = gen & (a > 0) & (ratio > 1.0 + config.eps_high)
        metrics = {
            "loss": loss.detach(),
            "pg_loss": (w * pg).sum().detach(),
            "imit_nll": imit.detach(),
            "clip_frac_low": (tm * low).sum(),
            "clip_frac_high": (tm * high).sum(),
            "ratio_mean": (tm * ratio).sum().detach(),
            "approx_kl_old": (tm * torch.where(gen, torch.expm1(-token_log_ratio) + token_log_ratio,
                                                      zero)).sum().detach(),
        }
        if config.dual_clip is not None:
            metrics["dual_clip_frac"] = (tm * (gen & (a < 0) & (ratio > config.dual_clip))).sum()
        if kl is not None:
            metrics["kl_ref"] = (tm * kl).sum().detach()
        if ent_g is not None:
            metrics["entropy"] = (tm * ent_g).sum().detach()
    return loss, metrics
