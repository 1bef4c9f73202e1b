"""Masked per-token log-probabilities (and entropies) straight from (vocabulary-parallel) logits.

    logp[n] = log softmax(logits[n] / T)[targets[n]]        H[n] = -sum_v p[n, v] log p[n, v]

Kernels (one program per token row; every loop streams the row once in ``BLOCK_V`` column blocks):

- ``_fwd_kernel``: ONE pass over the row with an online softmax in log2 units: running max ``m``, running
  sum ``d = sum exp2(x - m)`` and, for the entropy, ``s = sum exp2(x - m) * (x - m)``, all rescaled when the
  max grows; exponents are formed as ``fma(x, log2(e)/T, -m)`` (one rounding) so large logits keep full
  precision; the target logit is one scalar load. Without tensor parallelism it writes the final
  (logp, entropy, lse2); with ``tp_group`` it writes the rank's partial statistics (max, sum-exp, sum p*x
  around the max, raw target logit) which are exchanged with ONE all-gather of a [TP, 4, N] fp32 tensor and
  merged exactly by ``_tp_merge_kernel``. Logits are never gathered.
- ``_bwd_kernel``: ONE pass over the row writing
  ``dlogits = (g_logp * (onehot - p) - g_H * p * (log p + H)) / T`` in the logits dtype, either into a new
  buffer or over the logits themselves (``inplace_backward``). Masked rows are not read, only zero-filled.

Launch sizes on a GPU (``_triton_utils.vocab_launch_config``, overridable by environment for tuning): the
forward streams 2048 columns per trip with ONE warp per row (its two reductions per trip stay inside the
warp), the backward 8192 columns with 16 warps; both use 16-byte vector loads (checked for sm_90 by
tests/ops/test_compile.py).

Conventions (both ``impl``s):

- ``targets`` are global vocabulary ids. A position is *active* when its mask is true and
  ``0 <= target < vocab_size``. Inactive positions, including every target outside the vocabulary (e.g. an
  ignore index of -100, or an id in Megatron's padded columns ``>= vocab_size``), give logp = 0,
  entropy = 0 and a zero gradient: they are treated as masked, never as an error (an error would need a
  device-to-host sync on every call).
- ``vocab_size`` (default: ``V_local * TP``) removes the padded columns ``>= vocab_size`` from the softmax.
- With ``tp_group`` rank r holds the contiguous global ids ``[r * V_local, (r + 1) * V_local)`` (Megatron's
  layout); targets and mask must be the same on every rank (as Megatron replicates them). Every rank returns
  the same (replicated) logp/entropy and, in backward, the gradient of its own shard, with no collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from ._triton_utils import (
    all_gather_stacked,
    next_pow2,
    resolve_impl,
    row_geometry,
    tl,
    tp_info,
    triton,
    vocab_launch_config,
)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
N_STATS = 4  # rows of the per-token statistics buffer (see _fwd_kernel)

Tensor = torch.Tensor

if triton is not None:
    _LN2 = tl.constexpr(LN2)

    @triton.jit
    def _fwd_kernel(
        x_ptr, stride_a, stride_b, D1,  # row n of the logits sits at x_ptr + (n // D1) * stride_a + (n % D1) * stride_b
        tgt_ptr, mask_ptr, logp_ptr, ent_ptr, lse2_ptr, out_ptr, N,
        n_valid, vocab_start, vocab_size, scale2,  # scale2 = log2(e) / temperature
        HAS_MASK: tl.constexpr, WITH_ENT: tl.constexpr, FINAL: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        # FINAL: fp32 [N] logp, entropy (nats) and lse2 = log2 sum_v 2^(x_v * scale2). Else out_ptr: fp32
        # [N_STATS, N] = this shard's (running max m, sum 2^z, sum 2^z * z, raw target logit), z = x * scale2 - m.
        # Exponents are formed as fma(x, scale2, -m): one rounding of a small number, so large logits keep
        # full precision (m is only a shift: any error in it cancels in lse2).
        row = tl.program_id(0).to(tl.int64)
        t = tl.load(tgt_ptr + row).to(tl.int64)
        active = (t >= 0) & (t < vocab_size)
        if HAS_MASK:
            active = active & (tl.load(mask_ptr + row) != 0)
        if active.to(tl.int32) == 0:  # masked row: its logits are never read
            if FINAL:
                tl.store(logp_ptr + row, 0.0)
                if WITH_ENT:
                    tl.store(ent_ptr + row, 0.0)
                tl.store(lse2_ptr + row, 0.0)
            else:
                tl.store(out_ptr + row, float("-inf"))
                tl.store(out_ptr + N + row, 0.0)
                if WITH_ENT:
                    tl.store(out_ptr + 2 * N + row, 0.0)
                tl.store(out_ptr + 3 * N + row, 0.0)
            return
        i = row // D1
        j = row - i * D1
        base = x_ptr + i * stride_a + j * stride_b

        m = float("-inf")  # running max of x * scale2
        d = 0.0  # sum 2^z
        s = 0.0  # sum 2^z * z
        for start in range(0, n_valid, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            valid = cols < n_valid
            x = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0) * scale2)
            r = tl.exp2(m - m_new)
            z = tl.fma(x, scale2, -m_new)  # -inf on masked lanes
            e = tl.exp2(z)
            if WITH_ENT:
                shift = tl.where(d > 0.0, m - m_new, 0.0) * d  # s is re-centred on the new max
                s = r * (s + shift) + tl.sum(e * tl.where(valid, z, 0.0), axis=0)
            d = d * r + tl.sum(e, axis=0)
            m = m_new

        t_loc = t - vocab_start
        has_t = (t_loc >= 0) & (t_loc < n_valid)
        xt = tl.load(base + t_loc, mask=has_t, other=0.0).to(tl.float32)
        if FINAL:
            log2d = tl.log2(d)
            lse2 = m + log2d
            tl.store(logp_ptr + row, tl.fma(xt, scale2, -lse2) * _LN2)
            if WITH_ENT:
                tl.store(ent_ptr + row, (log2d - s / d) * _LN2)
            tl.store(lse2_ptr + row, lse2)
        else:  # this rank's partials; m = -inf, d = 0 when the shard is all padding
            tl.store(out_ptr + row, m)
            tl.store(out_ptr + N + row, d)
            if WITH_ENT:
                tl.store(out_ptr + 2 * N + row, s)
            tl.store(out_ptr + 3 * N + row, xt)

    @triton.jit
    def _tp_merge_kernel(
        stats_ptr, tgt_ptr, mask_ptr, logp_ptr, ent_ptr, lse2_ptr, N, vocab_size, scale2,
        TP: tl.constexpr, HAS_MASK: tl.constexpr, WITH_ENT: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # stats_ptr: fp32 [TP, N_STATS, N] gathered partials of _fwd_kernel -> fp32 [N] logp, entropy, lse2
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < N
        t = tl.load(tgt_ptr + offs, mask=inb, other=-1).to(tl.int64)
        active = inb & (t >= 0) & (t < vocab_size)
        if HAS_MASK:
            active = active & (tl.load(mask_ptr + offs, mask=inb, other=0) != 0)
        big_m = tl.full([BLOCK], float("-inf"), tl.float32)
        for r in tl.static_range(TP):
            big_m = tl.maximum(big_m, tl.load(stats_ptr + (r * 4 + 0) * N + offs, mask=inb, other=0.0))
        big_m = tl.where(big_m > float("-inf"), big_m, 0.0)
        dsum = tl.zeros([BLOCK], tl.float32)
        ssum = tl.zeros([BLOCK], tl.float32)
        xt = tl.zeros([BLOCK], tl.float32)
        for r in tl.static_range(TP):
            m_r = tl.load(stats_ptr + (r * 4 + 0) * N + offs, mask=inb, other=0.0)
            d_r = tl.load(stats_ptr + (r * 4 + 1) * N + offs, mask=inb, other=0.0)
            has = d_r > 0.0
            dm = tl.where(has, m_r - big_m, 0.0)
            sc = tl.where(has, tl.exp2(dm), 0.0)
            dsum += d_r * sc
            if WITH_ENT:
                s_r = tl.load(stats_ptr + (r * 4 + 2) * N + offs, mask=inb, other=0.0)
                ssum += sc * (s_r + dm * d_r)
            xt += tl.load(stats_ptr + (r * 4 + 3) * N + offs, mask=inb, other=0.0)  # one rank holds it
        dsum = tl.where(active, dsum, 1.0)
        log2d = tl.log2(dsum)
        lse2 = big_m + log2d
        tl.store(logp_ptr + offs, tl.where(active, tl.fma(xt, scale2, -lse2) * _LN2, 0.0), mask=inb)
        if WITH_ENT:
            tl.store(ent_ptr + offs, tl.where(active, (log2d - ssum / dsum) * _LN2, 0.0), mask=inb)
        tl.store(lse2_ptr + offs, tl.where(active, lse2, 0.0), mask=inb)

    @triton.jit
    def _bwd_kernel(
        x_ptr, stride_a, stride_b, g_ptr, g_stride_a, g_stride_b, D1,
        tgt_ptr, mask_ptr, lse2_ptr, ent_ptr, glogp_ptr, gent_ptr, gscale_ptr,
        n_cols, n_valid, vocab_start, vocab_size, scale2, inv_temp,
        HAS_MASK: tl.constexpr, HAS_GLOGP: tl.constexpr, ENT_GRAD: tl.constexpr, HAS_GSCALE: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        # dlogits = (g_logp * (onehot - p) - g_H * p * (log p + H)) / T; g_* are per row, times *gscale_ptr.
        row = tl.program_id(0).to(tl.int64)
        i = row // D1
        j = row - i * D1
        base = x_ptr + i * stride_a + j * stride_b
        gbase = g_ptr + i * g_stride_a + j * g_stride_b
        t = tl.load(tgt_ptr + row).to(tl.int64)
        active = (t >= 0) & (t < vocab_size)
        if HAS_MASK:
            active = active & (tl.load(mask_ptr + row) != 0)
        if active.to(tl.int32) == 0:  # masked row: write zeros, read nothing
            zero = tl.zeros([BLOCK_V], dtype=g_ptr.dtype.element_ty)
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(gbase + cols, zero, mask=cols < n_cols)
            return
        lse2 = tl.load(lse2_ptr + row)
        gl = 0.0
        if HAS_GLOGP:
            gl = tl.load(glogp_ptr + row)
        gh = 0.0
        ent = 0.0
        if ENT_GRAD:
            gh = tl.load(gent_ptr + row)
            ent = tl.load(ent_ptr + row)
        if HAS_GSCALE:
            gs = tl.load(gscale_ptr).to(tl.float32)
            gl = gl * gs
            gh = gh * gs
        t_loc = t - vocab_start
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            valid = cols < n_valid
            x = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32)
            lp2 = tl.fma(x, scale2, -lse2)  # log2 p, one rounding
            p = tl.exp2(lp2)
            if ENT_GRAD:
                coef = gl + gh * (lp2 * _LN2 + ent)
            else:
                coef = gl
            g = tl.where(cols == t_loc, gl, 0.0) - p * coef
            g = tl.where(valid, g * inv_temp, 0.0)
            tl.store(gbase + cols, g.to(g_ptr.dtype.element_ty), mask=cols < n_cols)


# ---------------------------------------------------------------------------------------------------------
# Plan: validated inputs + geometry, shared by masked_logprob and rcpa_loss_from_logits
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    x: Tensor  # the logits as the kernels see them ([..., V_local], unit last stride)
    lead_shape: Tuple[int, ...]
    n: int
    d1: int
    stride_a: int
    stride_b: int
    v_local: int
    n_valid: int  # columns of this shard below vocab_size
    vocab_start: int
    vocab_size: int
    targets: Tensor  # [N] integer
    mask: Optional[Tensor]  # [N] uint8 or None
    temperature: float
    tp_group: object
    tp_rank: int
    tp_world: int


def _check_temperature(temperature) -> float:
    t = float(temperature)
    if not (t > 0.0) or t != t or t == float("inf"):
        raise ValueError(f"temperature = {temperature!r}: expected a finite number > 0")
    return t


def _as_mask_u8(mask: Optional[Tensor], lead_shape, op: str) -> Optional[Tensor]:
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(lead_shape):
        raise ValueError(f"{op}: mask has shape {tuple(mask.shape)}, expected {tuple(lead_shape)} "
                         "(logits.shape[:-1])")
    m = mask.reshape(-1)
    if m.dtype == torch.bool:
        return m.contiguous().view(torch.uint8)
    return (m != 0).to(torch.uint8)


def _make_plan(logits: Tensor, targets: Tensor, mask: Optional[Tensor], temperature, tp_group,
               vocab_size: Optional[int], op: str) -> _Plan:
    if not isinstance(logits, Tensor) or logits.dim() < 1:
        raise ValueError(f"{op}: logits must be a tensor [..., V_local], got {type(logits).__name__}")
    lead = tuple(logits.shape[:-1])
    if tuple(targets.shape) != lead:
        raise ValueError(f"{op}: targets has shape {tuple(targets.shape)}, expected {lead} (logits.shape[:-1])")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(f"{op}: targets must be integer token ids, got dtype {targets.dtype}")
    rank, world = tp_info(tp_group)
    v_local = int(logits.shape[-1])
    full = v_local * world
    if vocab_size is None:
        vocab_size = full
    vocab_size = int(vocab_size)
    if not 1 <= vocab_size <= full:
        raise ValueError(f"{op}: vocab_size = {vocab_size}: expected 1 <= vocab_size <= V_local * TP = "
                         f"{v_local} * {world} = {full}")
    vocab_start = rank * v_local
    n_valid = max(0, min(v_local, vocab_size - vocab_start))
    x = logits
    geo = row_geometry(x)
    if geo is None:
        x = x.contiguous()
        geo = row_geometry(x)
    n, d1, sa, sb = geo
    return _Plan(x=x, lead_shape=lead, n=n, d1=d1, stride_a=sa, stride_b=sb, v_local=v_local, n_valid=n_valid,
                 vocab_start=vocab_start, vocab_size=vocab_size, targets=targets.reshape(-1).contiguous(),
                 mask=_as_mask_u8(mask, lead, op), temperature=_check_temperature(temperature),
                 tp_group=tp_group, tp_rank=rank, tp_world=world)


def _stats_forward(plan: _Plan, with_ent: bool) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """Triton forward: flat fp32 (logp [N], entropy [N] or None, lse2 [N]); one all-gather when TP > 1.
    lse2 = log2 sum_v 2^(x_v log2(e) / T) is what the backward needs."""
    x = plan.x
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"logits dtype {x.dtype} is not supported by the Triton kernels: expected one of "
                         f"{', '.join(str(d) for d in _SUPPORTED_DTYPES)}")
    n = plan.n
    dev = x.device
    block_v, warps, stages = vocab_launch_config(plan.v_local, n, dev, "fwd")
    final = plan.tp_world == 1
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    ent = torch.empty(n, dtype=torch.float32, device=dev) if with_ent else None
    lse2 = torch.empty(n, dtype=torch.float32, device=dev)  # log2-sum-exp2 of x * log2(e) / T (backward)
    stats = logp if final else torch.empty((N_STATS, n), dtype=torch.float32, device=dev)
    mask = plan.mask if plan.mask is not None else plan.targets  # dummy pointer when HAS_MASK is False
    ent_arg = ent if ent is not None else logp
    if n > 0:
        _fwd_kernel[(n,)](
            x, plan.stride_a, plan.stride_b, plan.d1,
            plan.targets, mask, logp, ent_arg, lse2, stats, n,
            plan.n_valid, plan.vocab_start, plan.vocab_size, LOG2E / plan.temperature,
            HAS_MASK=plan.mask is not None, WITH_ENT=with_ent, FINAL=final, BLOCK_V=block_v,
            num_warps=warps, num_stages=stages,
        )
    if not final:
        gathered = all_gather_stacked(stats, plan.tp_group, plan.tp_world)  # the ONE collective
        if n > 0:
            block = min(1024, next_pow2(max(n, 16)))
            _tp_merge_kernel[(triton.cdiv(n, block),)](
                gathered, plan.targets, mask, logp, ent_arg, lse2, n, plan.vocab_size, LOG2E / plan.temperature,
                TP=plan.tp_world, HAS_MASK=plan.mask is not None, WITH_ENT=with_ent, BLOCK=block,
            )
    return logp, ent, lse2


def _grad_backward(plan: _Plan, lse2: Tensor, ent: Optional[Tensor], g_logp: Optional[Tensor],
                   g_ent: Optional[Tensor], g_scale: Optional[Tensor], inplace: bool) -> Tensor:
    """Triton backward: the gradient w.r.t. plan.x (this rank's shard), in its dtype; one pass."""
    x = plan.x
    if inplace:
        g = x
        gsa, gsb = plan.stride_a, plan.stride_b
    else:
        g = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous: row n at n * V_local
        gsa, gsb = plan.d1 * plan.v_local, plan.v_local
    n = plan.n
    if n == 0:
        return g
    block_v, warps, stages = vocab_launch_config(plan.v_local, n, x.device, "bwd")
    dummy = lse2
    _bwd_kernel[(n,)](
        x, plan.stride_a, plan.stride_b, g, gsa, gsb, plan.d1,
        plan.targets, plan.mask if plan.mask is not None else plan.targets,
        lse2, ent if ent is not None else dummy,
        g_logp if g_logp is not None else dummy, g_ent if g_ent is not None else dummy,
        g_scale if g_scale is not None else dummy,
        plan.v_local, plan.n_valid, plan.vocab_start, plan.vocab_size, LOG2E / plan.temperature,
        1.0 / plan.temperature,
        HAS_MASK=plan.mask is not None, HAS_GLOGP=g_logp is not None, ENT_GRAD=g_ent is not None,
        HAS_GSCALE=g_scale is not None, BLOCK_V=block_v, num_warps=warps, num_stages=stages,
    )
    return g


def _flat_grad(g: Optional[Tensor]) -> Optional[Tensor]:
    if g is None:
        return None
    return g.reshape(-1).to(torch.float32).contiguous()


class _MaskedLogprobFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, mask, temperature, tp_group, vocab_size, return_entropy, inplace_backward):
        plan = _make_plan(logits, targets, mask, temperature, tp_group, vocab_size, "masked_logprob")
        logp, ent, lse2 = _stats_forward(plan, return_entropy)
        ctx.set_materialize_grads(False)
        ctx.plan = plan
        ctx.inplace = inplace_backward
        ctx.x_is_input = plan.x is logits
        if ctx.x_is_input:
            ctx.save_for_backward(logits, lse2, ent)
        else:
            ctx.save_for_backward(lse2, ent)
        ctx.plan.x = None if ctx.x_is_input else plan.x
        logp = logp.view(plan.lead_shape)
        if return_entropy:
            return logp, ent.view(plan.lead_shape)
        return logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        plan = ctx.plan
        if ctx.x_is_input:
            x, lse2, ent = ctx.saved_tensors
            plan.x = x
        else:
            lse2, ent = ctx.saved_tensors
        grad = _grad_backward(plan, lse2, ent, _flat_grad(g_logp), _flat_grad(g_ent), None, ctx.inplace)
        plan.x = None
        return grad, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------
# The plain torch path (reference); tensor-parallel through a differentiable gather of the statistics
# ---------------------------------------------------------------------------------------------------------


class _GatherStats(torch.autograd.Function):
    """All-gather of per-token statistics [K, N] -> [TP, K, N]; backward keeps this rank's slice (every rank
    computes the same replicated loss, so each rank owns the gradient of its own statistics)."""

    @staticmethod
    def forward(ctx, stats, group, rank, world):
        ctx.rank = rank
        return all_gather_stacked(stats, group, world)

    @staticmethod
    def backward(ctx, g):
        return g[ctx.rank], None, None, None


def _torch_active(plan: _Plan, device) -> Tensor:
    t = plan.targets.to(device)
    active = (t >= 0) & (t < plan.vocab_size)
    if plan.mask is not None:
        active = active & (plan.mask != 0)
    return active


def _torch_logprob(plan: _Plan, logits: Tensor, with_ent: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """Plain torch: fp32 log_softmax (TP=1) or exact merge of per-rank statistics (TP>1). Flat [N] outputs."""
    x = logits.reshape(-1, plan.v_local).float()
    if plan.temperature != 1.0:
        x = x / plan.temperature
    dev = x.device
    active = _torch_active(plan, dev)
    cols = torch.arange(plan.v_local, device=dev)
    valid_cols = cols < plan.n_valid
    t_loc = plan.targets.to(dev).long() - plan.vocab_start
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    if plan.tp_world == 1:
        if plan.n_valid < plan.v_local:
            x = x.masked_fill(~valid_cols, float("-inf"))
        lsm = torch.log_softmax(x, dim=-1)
        logp = lsm.gather(-1, t_loc.clamp(0, plan.v_local - 1)[:, None]).squeeze(-1)
        logp = torch.where(active, logp, zero)
        ent = None
        if with_ent:
            ent = -(lsm.exp() * lsm.masked_fill(~valid_cols, 0.0)).sum(-1)
            ent = torch.where(active, ent, zero)
        return logp, ent
    # tensor parallel: local (max, sum-exp, sum e*(x-max), target logit), one gather, exact merge
    m = x.masked_fill(~valid_cols, float("-inf")).amax(-1).detach()  # [N], -inf if no valid column
    xm = torch.where(valid_cols, x - torch.where(torch.isfinite(m), m, zero)[:, None], zero)
    e = torch.where(valid_cols, torch.exp(xm), zero)
    d = e.sum(-1)
    s = (e * xm).sum(-1)
    has_t = (t_loc >= 0) & (t_loc < plan.n_valid)
    xt = torch.where(has_t, x.gather(-1, t_loc.clamp(0, plan.v_local - 1)[:, None]).squeeze(-1), zero)
    stats = torch.stack([m, d, s, xt])
    g = _GatherStats.apply(stats, plan.tp_group, plan.tp_rank, plan.tp_world)
    gm, gd, gs, gxt = g[:, 0], g[:, 1], g[:, 2], g[:, 3]
    big_m = gm.amax(0)
    big_m = torch.where(torch.isfinite(big_m), big_m, zero)
    gm = torch.where(torch.isfinite(gm), gm, big_m)
    sc = torch.exp(gm - big_m)
    dsum = torch.where(active, (gd * sc).sum(0), torch.ones_like(big_m))
    lse2 = big_m + torch.log(dsum)
    logp = torch.where(active, gxt.sum(0) - lse2, zero)
    ent = None
    if with_ent:
        ssum = (sc * (gs + (gm - big_m) * gd)).sum(0)
        ent = torch.where(active, torch.log(dsum) - ssum / dsum, zero)
    return logp, ent


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def masked_logprob(
    logits: Tensor,
    targets: Tensor,
    mask: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    tp_group=None,
    vocab_size: Optional[int] = None,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    impl: str = "triton",
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """fp32 ``log p(targets)`` (and the entropy) of ``softmax(logits / temperature)``, 0 where inactive.

    Args:
        logits: ``[..., V_local]`` bf16/fp16/fp32, any leading shape and leading strides (Megatron's
            ``[S, B, V/TP]`` included); the last dim must be the vocabulary (a non-unit last stride, or more
            than two non-collapsible leading dims, costs a contiguous copy).
        targets: ``logits.shape[:-1]`` integer **global** token ids.
        mask: optional ``logits.shape[:-1]``, nonzero/True = compute. Positions whose target lies outside
            ``[0, vocab_size)`` are treated as masked too (not an error; see the module docstring).
        temperature: the sampling temperature T > 0 (logits are divided by it).
        tp_group: tensor-parallel group over which the vocabulary is sharded (Megatron layout); the result
            is exact and uses one all-gather of [TP, 4, N] fp32 statistics per call.
        vocab_size: the true vocabulary size; global ids ``>= vocab_size`` (Megatron's padding) are
            excluded from the softmax. Default ``V_local * TP``.
        return_entropy: also return the entropy (differentiable).
        inplace_backward: write the gradient over the logits storage and return it as the gradient
            (zero extra memory when the logits are an activation, e.g. the output layer's result; for a
            leaf tensor autograd copies it into ``.grad``). **The logits are destroyed by backward**: nothing
            else may read them after ``backward()`` (nor use them in another differentiable op), and
            backward can run only once.
        impl: ``"triton"`` (kernels), ``"torch"`` (plain reference path) or ``"auto"`` (triton on CUDA
            tensors or under TRITON_INTERPRET=1, else torch).

    Returns:
        ``logp`` (fp32, ``logits.shape[:-1]``), or ``(logp, entropy)`` when ``return_entropy``.
    """
    impl = resolve_impl(impl, "masked_logprob", logits)
    if impl == "torch":
        plan = _make_plan(logits, targets, mask, temperature, tp_group, vocab_size, "masked_logprob")
        logp, ent = _torch_logprob(plan, logits, return_entropy)
        logp = logp.view(plan.lead_shape)
        return (logp, ent.view(plan.lead_shape)) if return_entropy else logp
    return _MaskedLogprobFn.apply(logits, targets, mask, temperature, tp_group, vocab_size,
                                  bool(return_entropy), bool(inplace_backward))
