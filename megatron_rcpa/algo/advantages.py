"""Group advantages (RCPA_SPEC section 4), the plain-torch reference.

One scalar per rollout, computed within its group (the G rollouts of one prompt). Groups are given as
integer ids per rollout, so a packed batch may hold groups of different sizes in any order.
Estimators are registered by name in ``registry.ADVANTAGE_ESTIMATORS`` (``@register_advantage_estimator``
below, each with its branch id in the kernel ``ops.advantages``); see :mod:`.registry` for adding one.

A group of one member, or whose rewards are all equal, carries no signal: its advantages are exactly 0
and it is flagged in ``zero_var`` (the ``zero_var_frac`` metric).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import AdvantageConfig
from .registry import ADVANTAGE_ESTIMATORS, register_advantage_estimator


@dataclass
class AdvantageResult:
    advantages: torch.Tensor  # [N], the rewards' floating dtype (float32 for integer rewards)
    unique_ids: torch.Tensor  # [Gn] sorted group ids
    group_index: torch.Tensor  # [N] position of each rollout's group in unique_ids
    group_size: torch.Tensor  # [Gn] int64
    group_mean: torch.Tensor  # [Gn]
    group_std: torch.Tensor  # [Gn] unbiased (n - 1) std; 0 for one-member groups
    zero_var: torch.Tensor  # [Gn] bool: one member or all rewards equal
    zero_var_frac: float  # fraction of groups flagged zero_var

    @property
    def num_groups(self) -> int:
        return int(self.unique_ids.numel())


@dataclass
class GroupStats:
    """What every estimator gets, in float64."""

    rewards: torch.Tensor  # [N]
    index: torch.Tensor  # [N] group index
    size: torch.Tensor  # [Gn] float64
    mean: torch.Tensor  # [Gn]
    std: torch.Tensor  # [Gn] unbiased
    batch_std: torch.Tensor  # scalar, unbiased std over the whole batch
    eps: float
    use_batch_std: bool


@register_advantage_estimator("grpo", kernel_id=0)
def _grpo(s: GroupStats) -> torch.Tensor:
    denom = s.batch_std if s.use_batch_std else s.std[s.index]
    return (s.rewards - s.mean[s.index]) / (denom + s.eps)


@register_advantage_estimator("dr_grpo", kernel_id=1)
def _dr_grpo(s: GroupStats) -> torch.Tensor:
    return s.rewards - s.mean[s.index]


@register_advantage_estimator("rloo", kernel_id=2)
def _rloo(s: GroupStats) -> torch.Tensor:
    n = s.size[s.index]
    # r_j - (sum - r_j)/(n - 1)  ==  n/(n - 1) * (r_j - mean); one-member groups are zeroed by the caller.
    return (s.rewards - s.mean[s.index]) * n / (n - 1).clamp_min(1.0)


def group_statistics(rewards: torch.Tensor, group_ids: torch.Tensor):
    """Per-group size, mean, unbiased std, min == max flag, in float64. Returns a tuple
    (r64, unique_ids, index, size, mean, std, all_equal)."""
    r64 = rewards.to(torch.float64).reshape(-1)
    unique_ids, index = torch.unique(group_ids.reshape(-1), sorted=True, return_inverse=True)
    gn = unique_ids.numel()
    size = torch.zeros(gn, dtype=torch.float64, device=r64.device).index_add_(0, index, torch.ones_like(r64))
    mean = torch.zeros_like(size).index_add_(0, index, r64) / size
    sq = torch.zeros_like(size).index_add_(0, index, (r64 - mean[index]) ** 2)
    std = torch.where(size > 1, (sq / (size - 1).clamp_min(1.0)).sqrt(), torch.zeros_like(sq))
    gmax = torch.full_like(size, -torch.inf).scatter_reduce_(0, index, r64, "amax")
    gmin = torch.full_like(size, torch.inf).scatter_reduce_(0, index, r64, "amin")
    return r64, unique_ids, index, size, mean, std, gmax == gmin


def validate_inputs(rewards: torch.Tensor, group_ids: Optional[torch.Tensor], estimator: str, eps: float,
                    batch_std: bool, group_size: Optional[int]) -> torch.Tensor:
    """Check the inputs of an advantage computation (errors name the bad value); return the group ids
    (``group_size`` consecutive rollouts per group when ``group_ids`` is None). Shared with the kernel."""
    AdvantageConfig(estimator=estimator, eps=eps, batch_std=batch_std)  # validates, names the bad field
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten()[:5].tolist()
        raise ValueError(f"rewards contain NaN/inf at rollout index {bad}")
    n = rewards.numel()
    if group_ids is None:
        if group_size is None or group_size < 1 or n % group_size:
            raise ValueError(f"without group_ids, group_size must divide N = {n}; got group_size = {group_size}")
        group_ids = torch.arange(n, device=rewards.device) // group_size
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids shape {tuple(group_ids.shape)} != rewards shape {tuple(rewards.shape)}")
    if group_ids.is_floating_point():
        raise ValueError(f"group_ids must be integers, got dtype {group_ids.dtype}")
    return group_ids


def compute_advantages(
    rewards: torch.Tensor,
    group_ids: Optional[torch.Tensor] = None,
    *,
    estimator: str = "grpo",
    eps: float = 1e-6,
    batch_std: bool = False,
    group_size: Optional[int] = None,
) -> AdvantageResult:
    """Advantages of a packed batch of rollouts.

    rewards: [N] rewards, one per rollout. group_ids: [N] integer group (prompt) id per rollout, in any
    order; when None, ``group_size`` consecutive rollouts form a group. Computed in float64.
    """
    group_ids = validate_inputs(rewards, group_ids, estimator, eps, batch_std, group_size)
    n = rewards.numel()
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    if n == 0:
        empty = rewards.new_zeros(0, dtype=out_dtype)
        return AdvantageResult(empty, group_ids.new_zeros(0), group_ids.new_zeros(0), group_ids.new_zeros(0),
                               empty, empty, torch.zeros(0, dtype=torch.bool), 0.0)
    r64, unique_ids, index, size, mean, std, all_equal = group_statistics(rewards, group_ids)
    zero_var = (size < 2) | all_equal
    bstd = r64.std(unbiased=True) if n > 1 else r64.new_zeros(())
    stats = GroupStats(r64, index, size, mean, std, bstd, float(eps), bool(batch_std))
    adv = ADVANTAGE_ESTIMATORS.get(estimator).reference(stats)
    adv = torch.where(zero_var[index], torch.zeros_like(adv), adv)
    return AdvantageResult(
        advantages=adv.to(out_dtype),
        unique_ids=unique_ids,
        group_index=index,
        group_size=size.to(torch.int64),
        group_mean=mean.to(out_dtype),
        group_std=std.to(out_dtype),
        zero_var=zero_var,
        zero_var_frac=float(zero_var.double().mean()),
    )
