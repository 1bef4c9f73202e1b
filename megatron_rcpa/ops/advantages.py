"""Group advantages of a packed batch of rollouts in one Triton launch.

Equals ``megatron_rcpa.algo.advantages.compute_advantages`` (same ``AdvantageResult``, float64 arithmetic,
zero-variance groups exactly 0). Groups may have any sizes and arbitrary, unsorted integer ids.

Host side (a fixed number of small torch ops, independent of the number of groups): one stable sort of the
ids, ``unique_consecutive`` (sorted unique ids, counts), a scatter for the group index, a cumsum for the
segment starts, and the batch std when ``batch_std``. Then ``_group_adv_kernel`` runs one program per group:
it walks the group's members (contiguous in the sorted order) to get sum/max/min, then the sum of squared
deviations (two-pass, exact unbiased std), then writes every member's advantage at its original position.
The estimator is the ``EST`` constexpr: the ``kernel_id`` of its entry in
``megatron_rcpa.algo.registry.ADVANTAGE_ESTIMATORS`` (one branch per estimator; see that module for adding one).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..algo.advantages import AdvantageResult, compute_advantages, validate_inputs
from ..algo.registry import ADVANTAGE_ESTIMATORS
from ._triton_utils import interpreter_active, resolve_impl, tl, triton

Tensor = torch.Tensor

if triton is not None:

    @triton.jit
    def _group_adv_kernel(
        r_ptr, order_ptr, start_ptr, size_ptr, params_ptr,  # params: f64 [batch std, eps]
        adv_ptr, mean_ptr, std_ptr, zv_ptr,
        EST: tl.constexpr, BATCH_STD: tl.constexpr, BLOCK: tl.constexpr,
    ):
        g = tl.program_id(0)
        start = tl.load(start_ptr + g)
        n = tl.load(size_ptr + g).to(tl.int32)
        nf = n.to(tl.float64)
        acc = tl.zeros([BLOCK], tl.float64)
        mx = tl.full([BLOCK], float("-inf"), tl.float64)
        mn = tl.full([BLOCK], float("inf"), tl.float64)
        for k in range(0, n, BLOCK):
            idx = k + tl.arange(0, BLOCK)
            msk = idx < n
            pos = tl.load(order_ptr + start + idx, mask=msk, other=0)
            r = tl.load(r_ptr + pos, mask=msk, other=0.0).to(tl.float64)
            acc += tl.where(msk, r, 0.0)
            mx = tl.maximum(mx, tl.where(msk, r, float("-inf")))
            mn = tl.minimum(mn, tl.where(msk, r, float("inf")))
        mean = tl.sum(acc, axis=0) / nf
        zero_var = (n < 2) | (tl.max(mx, axis=0) == tl.min(mn, axis=0))
        sq = tl.zeros([BLOCK], tl.float64)
        for k in range(0, n, BLOCK):
            idx = k + tl.arange(0, BLOCK)
            msk = idx < n
            pos = tl.load(order_ptr + start + idx, mask=msk, other=0)
            r = tl.load(r_ptr + pos, mask=msk, other=0.0).to(tl.float64)
            dev = r - mean
            sq += tl.where(msk, dev * dev, 0.0)
        nm1 = tl.maximum(nf - 1.0, 1.0)
        std = tl.where(n > 1, tl.sqrt(tl.sum(sq, axis=0) / nm1), 0.0)  # fp64 sqrt is IEEE (sqrt.rn.f64)
        eps = tl.load(params_ptr + 1)
        if BATCH_STD:
            denom = tl.load(params_ptr) + eps
        else:
            denom = std + eps
        for k in range(0, n, BLOCK):
            idx = k + tl.arange(0, BLOCK)
            msk = idx < n
            pos = tl.load(order_ptr + start + idx, mask=msk, other=0)
            r = tl.load(r_ptr + pos, mask=msk, other=0.0).to(tl.float64)
            if EST == 0:  # grpo
                a = (r - mean) / denom
            elif EST == 1:  # dr_grpo
                a = r - mean
            elif EST == 2:  # rloo
                a = (r - mean) * nf / nm1
            else:
                tl.static_assert(False, "_group_adv_kernel: no branch for this EST (ADVANTAGE_ESTIMATORS kernel_id)")
            a = tl.where(zero_var, 0.0, a)
            tl.store(adv_ptr + pos, a.to(adv_ptr.dtype.element_ty), mask=msk)
        tl.store(mean_ptr + g, mean.to(mean_ptr.dtype.element_ty))
        tl.store(std_ptr + g, std.to(std_ptr.dtype.element_ty))
        tl.store(zv_ptr + g, zero_var.to(tl.uint8))


def group_advantages(
    rewards: Tensor,
    group_ids: Optional[Tensor] = None,
    *,
    estimator: str = "grpo",
    eps: float = 1e-6,
    batch_std: bool = False,
    group_size: Optional[int] = None,
    impl: str = "triton",
) -> AdvantageResult:
    """Advantages of a packed batch of rollouts (one Triton launch); see ``compute_advantages``.

    rewards: [N]; group_ids: [N] integer group (prompt) id per rollout, any order and values; when None,
    ``group_size`` consecutive rollouts form a group. estimator: a name in ``ADVANTAGE_ESTIMATORS``;
    ``batch_std`` divides by the unbiased std of the whole batch. Returns an ``AdvantageResult`` whose
    groups are sorted by id, with ``zero_var`` flags and ``zero_var_frac``.
    ``impl="torch"`` runs the reference; ``"auto"`` picks triton on CUDA / under the interpreter.
    """
    impl = resolve_impl(impl, "group_advantages", rewards)
    if impl == "torch":
        return compute_advantages(rewards, group_ids, estimator=estimator, eps=eps, batch_std=batch_std,
                                  group_size=group_size)
    group_ids = validate_inputs(rewards, group_ids, estimator, eps, batch_std, group_size)
    est = ADVANTAGE_ESTIMATORS.kernel_id(estimator, "ops.advantages._group_adv_kernel")
    n = rewards.numel()
    if n == 0:
        return compute_advantages(rewards, group_ids, estimator=estimator, eps=eps, batch_std=batch_std)
    dev = rewards.device
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    r = rewards if rewards.is_floating_point() else rewards.to(torch.float64)
    r = r.contiguous()
    ids = group_ids.reshape(-1)
    sorted_ids, order = torch.sort(ids, stable=True)
    unique_ids, inv_sorted, counts = torch.unique_consecutive(sorted_ids, return_inverse=True, return_counts=True)
    group_index = torch.empty_like(inv_sorted)
    group_index[order] = inv_sorted
    starts = torch.cumsum(counts, 0) - counts
    gn = int(unique_ids.numel())
    params = torch.zeros(2, dtype=torch.float64, device=dev)
    params[1] = float(eps)
    if batch_std and n > 1:
        params[0] = r.to(torch.float64).std(unbiased=True)
    store_dtype = out_dtype if out_dtype in (torch.float32, torch.float64) else torch.float64
    adv = torch.empty(n, dtype=store_dtype, device=dev)
    mean = torch.empty(gn, dtype=store_dtype, device=dev)
    std = torch.empty(gn, dtype=store_dtype, device=dev)
    zv = torch.empty(gn, dtype=torch.uint8, device=dev)
    block = 128 if interpreter_active() else 32
    _group_adv_kernel[(gn,)](
        r, order, starts, counts, params, adv, mean, std, zv,
        EST=est, BATCH_STD=bool(batch_std), BLOCK=block,
    )
    zero_var = zv.view(torch.bool)
    return AdvantageResult(
        advantages=adv.to(out_dtype),
        unique_ids=unique_ids,
        group_index=group_index,
        group_size=counts.to(torch.int64),
        group_mean=mean.to(out_dtype),
        group_std=std.to(out_dtype),
        zero_var=zero_var,
        zero_var_frac=float(zero_var.double().mean()),
    )
