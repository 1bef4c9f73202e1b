"""The RCPA loss (RCPA_SPEC section 4) fused with the log-probabilities, straight from the logits.

``rcpa_loss_from_logits`` equals ``megatron_rcpa.algo.loss.rcpa_loss`` applied to
``masked_logprob(logits, targets, return_entropy=True)`` in value, metrics and gradient w.r.t. the logits,
without keeping any [N, V] intermediate. It is one autograd Function:

forward
  1. ``logprob._fwd_kernel`` streams the logits once (online softmax) -> per-token logp, entropy, lse2
     (plus ONE all-gather of [TP, 4, N] statistics and ``_tp_merge_kernel`` under tensor parallelism). Only
     generated and constrained positions are read; every other row is skipped.
  2. ``_token_kernel`` (one launch over the N tokens) evaluates the per-token loss in closed form: ratio,
     clip-higher surrogate, dual clip, KL to the reference, entropy bonus, imitation, the aggregation weight,
     every metric as per-program partial sums, and the per-token weights ``dL/dlogp`` and ``dL/dH``
     (mirroring torch autograd of the reference, including its tie conventions). The KL estimator and the
     aggregation are the ``KL`` and ``AGG`` constexprs, the ``kernel_id`` of their entries in
     ``megatron_rcpa.algo.registry``. The sequence-level ratio (GSPO) and per-token aggregation weights
     (``AGG_PER_TOKEN``, e.g. seq_mean_token_mean) need per-sequence sums: a few ``index_add`` on [N] tensors.
backward
  3. ``logprob._bwd_kernel`` streams the logits once more and writes
     ``dlogits = g * (dL/dlogp * (onehot - p) - dL/dH * p * (log p + H)) / T`` in the logits dtype, into a
     new buffer or over the logits (``inplace_backward``); rows outside gen/constrained are only zeroed.
     ``g`` (the incoming gradient of the loss) is read on the device: no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ..algo.config import LossConfig
from ..algo.loss import GlobalCounts, count_tokens, imitation_weights, rcpa_loss, token_weights
from ..algo.registry import AGG_PER_TOKEN, AGG_UNIFORM, AGGREGATIONS, KL_ESTIMATORS
from ._triton_utils import next_pow2, resolve_impl, tl, triton
from .logprob import _grad_backward, _make_plan, _stats_forward, masked_logprob

Tensor = torch.Tensor

# order of the metric partial sums written by _token_kernel
_P_AGG, _P_PG, _P_IMIT, _P_LOW, _P_HIGH, _P_RATIO, _P_KLOLD, _P_DUAL, _P_KLREF, _P_ENT = range(10)
_NP = 16  # width of the partial-sum rows (>= 10, a power of two)

if triton is not None:

    @triton.jit
    def _expm1_minus_x(x):
        """expm1(x) - x, accurate for small |x| (Taylor series to x**9/9! below 0.5)."""
        p = 2.7557319223985893e-06  # 1/9!
        p = p * x + 2.48015873015873e-05  # 1/8!
        p = p * x + 0.0001984126984126984  # 1/7!
        p = p * x + 0.001388888888888889  # 1/6!
        p = p * x + 0.008333333333333333  # 1/5!
        p = p * x + 0.041666666666666664  # 1/4!
        p = p * x + 0.16666666666666666  # 1/3!
        p = p * x + 0.5  # 1/2!
        series = p * x * x
        direct = tl.exp(x) - 1.0 - x
        return tl.where(tl.abs(x) < 0.5, series, direct)

    @triton.jit
    def _token_kernel(
        logp_ptr, ent_ptr, old_ptr, adv_ptr, gen_ptr, ref_ptr, imitw_ptr, aggw_ptr, seqlr_ptr,
        dlogp_ptr, dent_ptr, dlr_ptr, part_ptr, N,
        agg_scale, tm_scale, lo, hi, dual_c, beta, alpha, lambda_t,
        HAS_REF: tl.constexpr, KL: tl.constexpr, USE_BETA: tl.constexpr, USE_ALPHA: tl.constexpr,
        HAS_CONS: tl.constexpr, AGG: tl.constexpr, SEQ_RATIO: tl.constexpr, HAS_DUAL: tl.constexpr,
        NP: tl.constexpr, BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < N
        gen = tl.load(gen_ptr + offs, mask=inb, other=0) != 0
        lp = tl.load(logp_ptr + offs, mask=inb, other=0.0)
        old = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        tlr = tl.where(gen, lp - old, 0.0)  # token log-ratio
        if SEQ_RATIO:
            lr = tl.load(seqlr_ptr + offs, mask=inb, other=0.0)  # sequence mean log-ratio, 0 off gen
        else:
            lr = tlr
        ratio = tl.exp(lr)
        a = tl.where(gen, tl.load(adv_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
        na = -a
        clipped = tl.minimum(tl.maximum(ratio, lo), hi)
        u = na * ratio
        c = na * clipped
        pg = tl.maximum(u, c)
        # d pg / d ratio as torch autograd gives it: maximum splits ties, clamp passes [lo, hi] inclusive
        in_rng = (ratio >= lo) & (ratio <= hi)
        d_c = tl.where(in_rng, na, 0.0)
        dpg = tl.where(u > c, na, tl.where(u < c, d_c, 0.5 * na + 0.5 * d_c))
        if HAS_DUAL:
            neg = a < 0.0
            cap = na * dual_c
            f = tl.where(pg < cap, 1.0, tl.where(pg == cap, 0.5, 0.0))  # minimum splits ties too
            dpg = tl.where(neg, dpg * f, dpg)
            pg = tl.where(neg, tl.minimum(pg, cap), pg)
        if AGG == 1:  # AGG_PER_TOKEN: weights from the host
            w = tl.load(aggw_ptr + offs, mask=inb, other=0.0)
        else:  # AGG_UNIFORM
            w = tl.where(gen, agg_scale, 0.0)
        tm = tl.where(gen, tm_scale, 0.0)

        term = pg
        dlp = tl.zeros([BLOCK], tl.float32)
        kl = tl.zeros([BLOCK], tl.float32)
        if HAS_REF:
            dd = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32) - lp
            if KL == 1:  # k1
                kl_t = -dd
                dkl = tl.full([BLOCK], 1.0, tl.float32)
            elif KL == 2:  # k2
                kl_t = 0.5 * dd * dd
                dkl = -dd
            elif KL == 3:  # k3
                kl_t = _expm1_minus_x(dd)
                dkl = -(kl_t + dd)  # 1 - exp(d) = -expm1(d)
            else:
                tl.static_assert(False, "_token_kernel: no branch for this KL (KL_ESTIMATORS kernel_id)")
            kl = tl.where(gen, kl_t, 0.0)
            if USE_BETA:
                term = term + beta * kl
                dlp += tl.where(gen, w * beta * dkl, 0.0)
        ent = tl.where(gen, tl.load(ent_ptr + offs, mask=inb, other=0.0), 0.0)
        if USE_ALPHA:
            term = term - alpha * ent
            tl.store(dent_ptr + offs, -alpha * w, mask=inb)
        imit = tl.zeros([BLOCK], tl.float32)
        if HAS_CONS:
            iw = tl.load(imitw_ptr + offs, mask=inb, other=0.0)  # 0 off the constrained set
            imit = -(iw * lp)
            dlp += -lambda_t * iw
        dlr = w * dpg * ratio  # dL / d log-ratio
        if SEQ_RATIO:
            tl.store(dlr_ptr + offs, tl.where(gen, dlr, 0.0), mask=inb)
        else:
            dlp += tl.where(gen, dlr, 0.0)
        tl.store(dlogp_ptr + offs, dlp, mask=inb)

        prow = part_ptr + pid.to(tl.int64) * NP
        tl.store(prow + 0, tl.sum(w * term, axis=0))
        tl.store(prow + 1, tl.sum(w * pg, axis=0))
        tl.store(prow + 2, tl.sum(imit, axis=0))
        tl.store(prow + 3, tl.sum(tl.where(gen & (a < 0.0) & (ratio < lo), tm, 0.0), axis=0))
        tl.store(prow + 4, tl.sum(tl.where(gen & (a > 0.0) & (ratio > hi), tm, 0.0), axis=0))
        tl.store(prow + 5, tl.sum(tm * ratio, axis=0))
        tl.store(prow + 6, tl.sum(tm * tl.where(gen, _expm1_minus_x(-tlr), 0.0), axis=0))
        if HAS_DUAL:
            tl.store(prow + 7, tl.sum(tl.where(gen & (a < 0.0) & (ratio > dual_c), tm, 0.0), axis=0))
        tl.store(prow + 8, tl.sum(tm * kl, axis=0))
        tl.store(prow + 9, tl.sum(tm * ent, axis=0))


@dataclass
class _TokenInputs:
    """The per-token side of the loss, flat [N] and validated."""

    old: Tensor
    adv: Tensor
    gen: Tensor  # bool
    ref: Optional[Tensor]
    cons: Optional[Tensor]  # bool
    sids: Optional[Tensor]
    pids: Optional[Tensor]
    config: LossConfig
    lambda_t: float
    counts: GlobalCounts
    kl_id: int  # the KL constexpr: KL_ESTIMATORS' kernel_id; 0 (unused) without ref
    imitw: Optional[Tensor] = None  # given per-token imitation weights (float64); None: this call's own


def _flat(x: Optional[Tensor], shape, name: str) -> Optional[Tensor]:
    if x is None:
        return None
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"rcpa_loss_from_logits: {name} has shape {tuple(x.shape)}, expected {tuple(shape)} "
                         "(logits.shape[:-1])")
    return x.reshape(-1)


def _token_inputs(lead, old_logp, advantages, gen_mask, config, ref_logp, constrained_mask, seq_ids,
                  prompt_ids, lambda_t, counts, imitation_weight=None) -> _TokenInputs:
    if not isinstance(config, LossConfig):
        raise ValueError(f"rcpa_loss_from_logits: config must be a LossConfig, got {type(config).__name__}")
    old = _flat(old_logp, lead, "old_logp")
    adv = _flat(advantages, lead, "advantages")
    gen = _flat(gen_mask, lead, "gen_mask").bool()
    ref = _flat(ref_logp, lead, "ref_logp")
    cons = _flat(constrained_mask, lead, "constrained_mask")
    sids = _flat(seq_ids, lead, "seq_ids")
    pids = _flat(prompt_ids, lead, "prompt_ids")
    if config.beta > 0 and ref is None:
        raise ValueError(f"LossConfig.beta = {config.beta} > 0 needs ref_logp")
    if lambda_t < 0:
        raise ValueError(f"lambda_t = {lambda_t} must be >= 0")
    if config.ratio_level == "sequence" and sids is None:
        raise ValueError("ratio_level = 'sequence' needs seq_ids")
    if AGGREGATIONS.get(config.aggregation).needs_seq_ids and sids is None:
        raise ValueError(f"aggregation = {config.aggregation!r} needs seq_ids")
    if cons is not None:
        cons = cons.bool()
        if bool((cons & gen).any()):
            raise ValueError("gen_mask and constrained_mask overlap: a token is either forced or generated")
    # the KL branch is compiled only with a reference (HAS_REF); resolved here, before any launch
    kl_id = KL_ESTIMATORS.kernel_id(config.kl_type, "ops.rcpa_loss._token_kernel") if ref is not None else 0
    imitw = _flat(imitation_weight, lead, "imitation_weight")
    if imitw is not None:
        imitw = torch.where(cons, imitw.double(), 0.0) if cons is not None else None
    if counts is None:
        counts = count_tokens(gen, cons, sids, pids)
        if imitw is not None:
            counts = GlobalCounts(counts.num_gen_tokens, counts.num_seqs, float(imitw.sum()))
    return _TokenInputs(old, adv, gen, ref, cons, sids, pids, config, float(lambda_t), counts, kl_id, imitw)


def _token_step(logp: Tensor, ent: Tensor, ti: _TokenInputs) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(metric vector [_NP] with the loss at index 15, dL/dlogp [N], dL/dH [N] or None) of the RCPA loss."""
    cfg = ti.config
    n = logp.numel()
    dev = logp.device
    f32 = torch.float32
    gen = ti.gen
    seq_ratio = cfg.ratio_level == "sequence"
    agg = AGGREGATIONS.get(cfg.aggregation)
    seq_idx, nseq = (None, 0)
    if ti.sids is not None and (seq_ratio or agg.kernel_id == AGG_PER_TOKEN):  # per-sequence sums are needed
        uniq, seq_idx = torch.unique(ti.sids, return_inverse=True)
        nseq = int(uniq.numel())
    seqlr = seq_len = None
    if seq_ratio:
        g = gen.to(f32)
        tlr = torch.where(gen, logp - ti.old.to(f32), torch.zeros((), dtype=f32, device=dev))
        seq_sum = torch.zeros(nseq, dtype=f32, device=dev).index_add(0, seq_idx, tlr)
        seq_len = torch.zeros(nseq, dtype=f32, device=dev).index_add(0, seq_idx, g).clamp_min(1.0)
        seqlr = torch.where(gen, (seq_sum / seq_len)[seq_idx], torch.zeros((), dtype=f32, device=dev))
    aggw = None
    agg_scale = 0.0
    if agg.kernel_id == AGG_UNIFORM:
        agg_scale = agg.kernel_scale(cfg, ti.counts)
    else:
        aggw = token_weights(gen, seq_idx, nseq, cfg, ti.counts).to(f32).contiguous()
    imitw = None
    if ti.cons is not None:
        base = ti.imitw if ti.imitw is not None else imitation_weights(ti.cons, ti.sids, ti.pids)
        imitw = (base.to(f32)
                 / max(ti.counts.num_imit_tokens, 1.0)).contiguous()

    use_alpha = cfg.alpha > 0
    block = min(1024, next_pow2(max(n, 16)))
    grid = triton.cdiv(n, block) if n > 0 else 0
    partials = torch.zeros((max(grid, 1), _NP), dtype=f32, device=dev)
    dlogp = torch.empty(n, dtype=f32, device=dev)
    dent = torch.empty(n, dtype=f32, device=dev) if use_alpha else None
    dlr = torch.empty(n, dtype=f32, device=dev) if seq_ratio else None
    gen_u8 = gen.contiguous().view(torch.uint8)
    dummy = logp
    if grid > 0:
        _token_kernel[(grid,)](
            logp, ent, ti.old.contiguous(), ti.adv.contiguous(), gen_u8,
            ti.ref.contiguous() if ti.ref is not None else dummy,
            imitw if imitw is not None else dummy, aggw if aggw is not None else dummy,
            seqlr if seqlr is not None else dummy,
            dlogp, dent if dent is not None else dummy, dlr if dlr is not None else dummy, partials, n,
            agg_scale, 1.0 / max(ti.counts.num_gen_tokens, 1.0), 1.0 - cfg.eps_low, 1.0 + cfg.eps_high,
            float(cfg.dual_clip) if cfg.dual_clip is not None else 0.0, float(cfg.beta), float(cfg.alpha),
            ti.lambda_t,
            HAS_REF=ti.ref is not None, KL=ti.kl_id, USE_BETA=cfg.beta > 0, USE_ALPHA=use_alpha,
            HAS_CONS=ti.cons is not None, AGG=agg.kernel_id, SEQ_RATIO=seq_ratio,
            HAS_DUAL=cfg.dual_clip is not None, NP=_NP, BLOCK=block,
        )
    if seq_ratio:
        per_seq = torch.zeros(nseq, dtype=f32, device=dev).index_add(0, seq_idx, dlr) / seq_len
        dlogp = dlogp + torch.where(gen, per_seq[seq_idx], torch.zeros((), dtype=f32, device=dev))
    vec = partials.sum(0)
    vec[_NP - 1] = vec[_P_AGG] + ti.lambda_t * vec[_P_IMIT]
    return vec, dlogp, dent


def _metrics(vec: Tensor, ti: _TokenInputs) -> Dict[str, Tensor]:
    m = {
        "loss": vec[_NP - 1],
        "pg_loss": vec[_P_PG],
        "imit_nll": vec[_P_IMIT],
        "clip_frac_low": vec[_P_LOW],
        "clip_frac_high": vec[_P_HIGH],
        "ratio_mean": vec[_P_RATIO],
        "approx_kl_old": vec[_P_KLOLD],
    }
    if ti.config.dual_clip is not None:
        m["dual_clip_frac"] = vec[_P_DUAL]
    if ti.ref is not None:
        m["kl_ref"] = vec[_P_KLREF]
    m["entropy"] = vec[_P_ENT]
    return m


class _RCPAFromLogitsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, row_mask, temperature, tp_group, vocab_size, ti, inplace_backward):
        ctx.set_materialize_grads(False)
        plan = _make_plan(logits, targets, row_mask, temperature, tp_group, vocab_size, "rcpa_loss_from_logits")
        logp, ent, lse2 = _stats_forward(plan, with_ent=True)
        vec, dlogp, dent = _token_step(logp, ent, ti)
        ctx.plan = plan
        ctx.inplace = inplace_backward
        ctx.x_is_input = plan.x is logits
        saved = [lse2, ent, dlogp, dent]
        if ctx.x_is_input:
            saved.append(logits)
            plan.x = None
        ctx.save_for_backward(*saved)
        loss = vec[_NP - 1].clone()
        metrics = vec.detach()
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, g_loss, _g_metrics):
        if g_loss is None:
            return (None,) * 8
        saved = ctx.saved_tensors
        lse2, ent, dlogp, dent = saved[:4]
        plan = ctx.plan
        if ctx.x_is_input:
            plan.x = saved[4]
        g_scale = g_loss.detach().to(torch.float32).reshape(()).contiguous()
        grad = _grad_backward(plan, lse2, ent, dlogp, dent, g_scale, ctx.inplace)
        plan.x = None
        return grad, None, None, None, None, None, None, None


def rcpa_loss_from_logits(
    logits: Tensor,
    targets: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    gen_mask: Tensor,
    *,
    config: LossConfig,
    ref_logp: Optional[Tensor] = None,
    constrained_mask: Optional[Tensor] = None,
    seq_ids: Optional[Tensor] = None,
    prompt_ids: Optional[Tensor] = None,
    lambda_t: float = 0.0,
    counts: Optional[GlobalCounts] = None,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    tp_group=None,
    inplace_backward: bool = False,
    impl: str = "triton",
    imitation_weight: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The RCPA loss and its metrics computed from the policy logits, fused (see the module docstring).

    ``logits`` ``[..., V_local]`` and ``targets`` (global ids) as in :func:`masked_logprob`; every per-token
    tensor has shape ``logits.shape[:-1]`` and means what it means in ``megatron_rcpa.algo.loss.rcpa_loss``,
    which this equals when applied to ``masked_logprob(logits, targets, return_entropy=True, ...)``.
    Positions that are neither generated nor constrained are never read. The entropy is always computed
    (it costs no extra memory traffic) and reported as ``metrics["entropy"]``; its gradient is only
    formed when ``config.alpha > 0``.

    ``inplace_backward=True`` writes the gradient over the logits storage (zero extra memory; the logits
    are destroyed by backward, which can then run only once). ``impl="torch"`` runs the plain reference
    (``masked_logprob(impl="torch")`` + ``rcpa_loss``); ``"auto"`` picks triton on CUDA / interpreter.
    Pass ``counts`` (global over micro-batches and data-parallel ranks) to avoid host syncs and to
    normalise globally, and ``imitation_weight`` (``logits.shape[:-1]``) when the micro-batch holds only some of
    a prompt's rollouts (see ``algo.loss.rcpa_loss``).

    Returns ``(loss, metrics)``: a 0-dim fp32 loss, differentiable w.r.t. ``logits``, and detached metrics.
    """
    impl = resolve_impl(impl, "rcpa_loss_from_logits", logits)
    if impl == "torch":
        logp, ent = masked_logprob(logits, targets, None, temperature=temperature, tp_group=tp_group,
                                   vocab_size=vocab_size, return_entropy=True, impl="torch")
        return rcpa_loss(logp, old_logp, advantages, gen_mask, config=config, ref_logp=ref_logp, entropy=ent,
                         constrained_mask=constrained_mask, seq_ids=seq_ids, prompt_ids=prompt_ids,
                         lambda_t=lambda_t, counts=counts, imitation_weight=imitation_weight)
    lead = tuple(logits.shape[:-1])
    ti = _token_inputs(lead, old_logp, advantages, gen_mask, config, ref_logp, constrained_mask, seq_ids,
                       prompt_ids, lambda_t, counts, imitation_weight)
    row_mask = ti.gen if ti.cons is None else (ti.gen | ti.cons)
    loss, vec = _RCPAFromLogitsFn.apply(logits, targets, row_mask.view(lead), temperature, tp_group, vocab_size,
                                        ti, bool(inplace_backward))
    return loss, _metrics(vec, ti)
