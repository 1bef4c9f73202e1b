"""Group advantages: hand-computed cases and properties (RCPA_SPEC section 4)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rcpa.algo import ADVANTAGE_ESTIMATORS, compute_advantages

STD4 = math.sqrt(1.0 / 3.0)  # unbiased std of [1, 0, 1, 0]

BY_HAND = [  # one case per registered estimator (test_every_estimator_has_a_case_by_hand)
    ("grpo", [0.5 / (STD4 + 1e-6), -0.5 / (STD4 + 1e-6)] * 2),
    ("dr_grpo", [0.5, -0.5, 0.5, -0.5]),
    ("rloo", [2 / 3, -2 / 3, 2 / 3, -2 / 3]),  # 1 - (0+1+0)/3 and 0 - (1+0+1)/3
]


def test_every_estimator_has_a_case_by_hand():
    assert [name for name, _ in BY_HAND] == list(ADVANTAGE_ESTIMATORS.names())


@pytest.mark.parametrize("estimator, expected", BY_HAND)
def test_estimators_by_hand(estimator, expected):
    res = compute_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64),
                             torch.tensor([7, 7, 7, 7]), estimator=estimator)
    torch.testing.assert_close(res.advantages, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert res.group_mean.tolist() == [0.5]
    assert res.group_std.item() == pytest.approx(STD4)
    assert res.zero_var.tolist() == [False] and res.zero_var_frac == 0.0


def test_batch_std_by_hand():
    r = torch.tensor([1.0, 0.0, 3.0, 1.0], dtype=torch.float64)
    bstd = math.sqrt(((1 - 1.25) ** 2 + 1.25**2 + 1.75**2 + 0.25**2) / 3)
    res = compute_advantages(r, torch.tensor([0, 0, 1, 1]), batch_std=True)
    expected = [0.5 / (bstd + 1e-6), -0.5 / (bstd + 1e-6), 1 / (bstd + 1e-6), -1 / (bstd + 1e-6)]
    torch.testing.assert_close(res.advantages, torch.tensor(expected, dtype=torch.float64))


def test_packed_unsorted_variable_groups_and_zero_variance():
    # group 3: two members; group -1: one member; group 10: all equal; group 5: three members, interleaved.
    r = torch.tensor([0.0, 1.0, 2.0, 5.0, 1.0, 2.0, 2.0, 4.0, 0.5])
    g = torch.tensor([3, 5, 10, -1, 3, 10, 10, 5, 5])
    res = compute_advantages(r, g, estimator="dr_grpo")
    assert res.unique_ids.tolist() == [-1, 3, 5, 10]
    assert res.group_size.tolist() == [1, 2, 3, 3]
    assert res.zero_var.tolist() == [True, False, False, True]
    assert res.zero_var_frac == 0.5
    m5 = (1.0 + 4.0 + 0.5) / 3
    expected = [-0.5, 1 - m5, 0, 0, 0.5, 0, 0, 4 - m5, 0.5 - m5]
    torch.testing.assert_close(res.advantages, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert res.advantages.dtype == torch.float32


def test_consecutive_groups_without_ids_and_integer_rewards():
    res = compute_advantages(torch.tensor([1, 0, 0, 0]), group_size=2, estimator="dr_grpo")
    assert res.advantages.tolist() == [0.5, -0.5, 0.0, 0.0]
    assert res.advantages.dtype == torch.float32


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="NaN/inf at rollout index \\[1\\]"):
        compute_advantages(torch.tensor([0.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="estimator = 'ppo'"):
        compute_advantages(torch.tensor([0.0, 1.0]), torch.tensor([0, 0]), estimator="ppo")
    with pytest.raises(ValueError, match="group_size must divide N = 3"):
        compute_advantages(torch.tensor([0.0, 1.0, 2.0]), group_size=2)
    with pytest.raises(ValueError, match="group_ids must be integers"):
        compute_advantages(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0]))


groups = st.lists(
    st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=9), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(groups=groups, estimator=st.sampled_from(ADVANTAGE_ESTIMATORS.names()), seed=st.integers(0, 1000))
def test_group_sums_vanish_and_zero_variance_gives_zero(groups, estimator, seed):
    rewards = torch.tensor([r for g in groups for r in g], dtype=torch.float64)
    ids = torch.tensor([i * 13 - 40 for i, g in enumerate(groups) for _ in g])
    perm = torch.randperm(len(rewards), generator=torch.Generator().manual_seed(seed))
    res = compute_advantages(rewards[perm], ids[perm], estimator=estimator)
    adv = torch.empty_like(rewards)
    adv[perm] = res.advantages
    start = 0
    for g in groups:
        a = adv[start:start + len(g)]
        start += len(g)
        if len(g) == 1 or max(g) == min(g):
            assert a.abs().max().item() == 0.0
        else:
            scale = 1.0 if estimator != "grpo" else 1.0 / (torch.tensor(g, dtype=torch.float64).std().item() + 1e-6)
            assert abs(a.sum().item()) <= 1e-9 * max(1.0, scale * 10 * len(g))
    n_zero = sum(1 for g in groups if len(g) == 1 or max(g) == min(g))
    assert res.zero_var_frac == pytest.approx(n_zero / len(groups))
