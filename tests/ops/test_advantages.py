"""group_advantages (one Triton launch) against the algo reference compute_advantages."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_rcpa.algo import AdvantageConfig
from megatron_rcpa.algo.advantages import AdvantageResult, compute_advantages
from megatron_rcpa.algo.registry import ADVANTAGE_ESTIMATORS, register_advantage_estimator
from megatron_rcpa.ops import group_advantages

pytestmark = pytest.mark.triton

FIELDS = ("advantages", "unique_ids", "group_index", "group_size", "group_mean", "group_std", "zero_var")


def assert_same(got: AdvantageResult, want: AdvantageResult):
    assert isinstance(got, AdvantageResult)
    for f in FIELDS:
        a, b = getattr(got, f), getattr(want, f)
        assert a.dtype == b.dtype and a.shape == b.shape, (f, a, b)
        a, b = a.cpu(), b.cpu()
        if a.is_floating_point():
            # both compute in float64; only the summation order differs
            rtol = 1e-12 if a.dtype == torch.float64 else 1e-6
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol, msg=f)
        else:
            assert torch.equal(a, b), (f, a, b)
    assert got.zero_var_frac == want.zero_var_frac
    # zero-variance groups get exactly 0
    assert torch.all(got.advantages.cpu()[got.zero_var.cpu()[got.group_index.cpu()]] == 0)


@st.composite
def packed_batches(draw):
    sizes = draw(st.lists(st.integers(1, 9), min_size=1, max_size=12))
    ids = draw(st.lists(st.integers(-(2**40), 2**40), min_size=len(sizes), max_size=len(sizes), unique=True))
    kind = draw(st.sampled_from(["binary", "levels", "continuous"]))
    rewards = []
    for n in sizes:
        if kind == "binary":
            rewards += draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n))
        elif kind == "levels":
            rewards += draw(st.lists(st.sampled_from([-1.0, 0.1, 0.3, 0.7]), min_size=n, max_size=n))
        else:
            rewards += draw(st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=n, max_size=n))
    group_ids = [gid for gid, n in zip(ids, sizes) for _ in range(n)]
    perm = draw(st.permutations(range(len(group_ids))))
    return [rewards[i] for i in perm], [group_ids[i] for i in perm]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=packed_batches(), estimator=st.sampled_from(ADVANTAGE_ESTIMATORS.names()), batch_std=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_random_packed_groups_match_reference(batch, estimator, batch_std, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rewards = torch.tensor(batch[0], dtype=dtype, device=device)
    ids = torch.tensor(batch[1], dtype=torch.int64, device=device)
    got = group_advantages(rewards, ids, estimator=estimator, batch_std=batch_std)
    want = compute_advantages(rewards, ids, estimator=estimator, batch_std=batch_std)
    assert_same(got, want)


@pytest.mark.parametrize("estimator", ADVANTAGE_ESTIMATORS.names())
def test_large_groups_loop_over_blocks(estimator, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.full((300,), 7), torch.full((5,), -2), torch.full((130,), 3)])
    ids = ids[torch.randperm(ids.numel(), generator=g)]
    rewards = torch.randn(ids.numel(), generator=g, dtype=torch.float64)
    rewards[ids == -2] = 0.25  # a zero-variance group
    ids, rewards = ids.to(device), rewards.to(device)
    got = group_advantages(rewards, ids, estimator=estimator, eps=1e-4)
    assert_same(got, compute_advantages(rewards, ids, estimator=estimator, eps=1e-4))
    assert got.zero_var.tolist() == [True, False, False]


def test_other_reward_dtypes_and_consecutive_groups(device):
    ints = torch.tensor([1, 0, 0, 1, 1, 1, 0, 2], device=device)
    assert_same(group_advantages(ints, group_size=4), compute_advantages(ints, group_size=4))
    bf = torch.tensor([0.5, 0.25, 1.0, 0.0, 0.75, 0.75], dtype=torch.bfloat16, device=device)
    ids = torch.tensor([1, 2, 1, 2, 3, 3], dtype=torch.int32, device=device)
    assert_same(group_advantages(bf, ids), compute_advantages(bf, ids))


def test_torch_impl_and_empty(device):
    r = torch.tensor([1.0, 0.0, 0.5], device=device)
    ids = torch.tensor([4, 4, 9], device=device)
    assert_same(group_advantages(r, ids, impl="torch"), compute_advantages(r, ids))
    e = group_advantages(torch.zeros(0, device=device), torch.zeros(0, dtype=torch.long, device=device))
    assert e.advantages.numel() == 0 and e.zero_var_frac == 0.0


def test_errors(device):
    r = torch.tensor([1.0, float("nan")], device=device)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(r, torch.tensor([0, 0], device=device))
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(torch.ones(2, device=device), torch.zeros(2, dtype=torch.long, device=device),
                         estimator="ppo")
    with pytest.raises(ValueError, match="shape"):
        group_advantages(torch.ones(3, device=device), torch.zeros(2, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="integers"):
        group_advantages(torch.ones(2, device=device), torch.zeros(2, device=device))
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.ones(3, device=device), group_size=2)


def test_registered_estimators_have_their_kernel_branch():
    assert set(ADVANTAGE_ESTIMATORS.names()) >= {"grpo", "dr_grpo", "rloo"}
    for name in ADVANTAGE_ESTIMATORS:  # the kernel tests above run every registered estimator
        assert ADVANTAGE_ESTIMATORS.get(name).kernel_id is not None, name


def test_a_new_estimator_is_one_registration_and_its_kernel_branch(device):
    """A reference-only registration validates and runs in torch; the kernel refuses it by name. An id the
    kernel has no branch for fails when the kernel is built, not with a wrong result."""
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 0.0], device=device)

    @register_advantage_estimator("test_centred_over_size", kernel_id=None)
    def _centred_over_size(s):
        return (s.rewards - s.mean[s.index]) / s.size[s.index]

    try:
        assert AdvantageConfig(estimator="test_centred_over_size").estimator == "test_centred_over_size"
        got = compute_advantages(r, group_size=2, estimator="test_centred_over_size")
        assert got.advantages.tolist() == pytest.approx([0.25, -0.25, 0.0, 0.0, 0.5, -0.5])
        assert_same(group_advantages(r, group_size=2, estimator="test_centred_over_size", impl="torch"), got)
        with pytest.raises(ValueError, match="'test_centred_over_size': this advantage estimator has no branch in "
                                             "ops.advantages._group_adv_kernel"):
            group_advantages(r, group_size=2, estimator="test_centred_over_size")
        with pytest.raises(ValueError, match="already registered"):
            register_advantage_estimator("test_centred_over_size", kernel_id=None)(_centred_over_size)
        with pytest.raises(ValueError, match="kernel_id = 0 is already the branch of 'grpo'"):
            register_advantage_estimator("test_other", kernel_id=0)(_centred_over_size)
    finally:
        ADVANTAGE_ESTIMATORS.remove("test_centred_over_size")
    with pytest.raises(ValueError, match="AdvantageConfig.estimator = 'test_centred_over_size'"):
        AdvantageConfig(estimator="test_centred_over_size")

    register_advantage_estimator("test_no_branch", kernel_id=99)(_centred_over_size)
    try:
        with pytest.raises(Exception, match="no branch for this EST"):
            group_advantages(r, group_size=2, estimator="test_no_branch")
    finally:
        ADVANTAGE_ESTIMATORS.remove("test_no_branch")
