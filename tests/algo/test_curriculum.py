"""The curriculum: rho formula, schedules, ratchet, per-prompt difficulty, phases, state round-trip."""

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rcpa.algo import (
    PRE_ALIGNMENT,
    REINFORCEMENT_ALIGNMENT,
    Curriculum,
    CurriculumConfig,
    schedule_value,
)


@pytest.mark.parametrize("f, gamma, expected", [
    (0.0, 1.0, 0.9), (0.05, 1.0, 0.9), (0.325, 1.0, 0.45), (0.325, 2.0, 0.225), (0.6, 1.0, 0.0), (0.9, 1.0, 0.0),
])
def test_familiarity_schedule_by_hand(f, gamma, expected):
    assert schedule_value(CurriculumConfig(gamma=gamma), 0, f) == pytest.approx(expected)


@pytest.mark.parametrize("schedule, step, expected", [
    ("step_linear", 0, 0.9), ("step_linear", 50, 0.45), ("step_linear", 150, 0.0),
    ("step_cosine", 50, 0.45), ("step_cosine", 100, 0.0),
    ("step_exponential", 0, 0.9), ("step_exponential", 100, 0.0),
    ("step_exponential", 20, 0.9 * (math.exp(-1) - math.exp(-5)) / (1 - math.exp(-5))),
    ("constant", 10**6, 0.9),
])
def test_step_schedules_by_hand(schedule, step, expected):
    cfg = CurriculumConfig(schedule=schedule, decay_steps=100)
    assert schedule_value(cfg, step, familiarity=1.0) == pytest.approx(expected, abs=1e-12)


def test_plan_prefix_lengths_and_probes():
    c = Curriculum(CurriculumConfig(probe_fraction=0.25))
    plan = c.plan([f"p{i}" for i in range(8)], [10, 11, 20, 0, 5, 7, 9, 3])
    assert sum(plan.is_probe) == 2
    for probe, k, n, rho in zip(plan.is_probe, plan.k, plan.lengths, plan.rho):
        assert k == (0 if probe else math.floor(0.9 * n))
        assert rho == (0.0 if probe else 0.9)
    assert Curriculum(CurriculumConfig(probe_fraction=0.25, seed=0)).plan(list(range(8)), [4] * 8).is_probe == \
        plan.is_probe  # the probe draw depends only on (seed, step)
    with pytest.raises(ValueError, match="prompt 'x' has no reference"):
        Curriculum(CurriculumConfig(probe_fraction=0.0)).plan(["x"], [None])
    with pytest.raises(ValueError, match="reference length of prompt 'y' = -1"):
        c.plan(["y"], [-1])


def test_rho_reaches_zero_past_f_high_and_phase_switches_after_settle_steps():
    c = Curriculum(CurriculumConfig(settle_steps=3, ema=0.5))
    keys = list(range(8))
    history = []
    for _ in range(40):
        plan = c.plan(keys, [10] * 8)
        m = c.update(plan, [[1.0] * 4] * 8)
        history.append((c.familiarity, c.rho, c.phase))
        if c.phase == REINFORCEMENT_ALIGNMENT:
            break
    first_zero = next(i for i, (f, rho, _) in enumerate(history) if rho == 0.0)
    assert history[first_zero][0] >= 0.6 and history[first_zero - 1][0] < 0.6  # rho hits 0 as f passes f_high
    assert all(p == PRE_ALIGNMENT for _, _, p in history[: first_zero + 2])
    assert history[first_zero + 2][2] == REINFORCEMENT_ALIGNMENT  # third step at rho = 0
    assert c.switch_step == first_zero + 3
    assert m["phase"] == 1.0 and c.lambda_t(1.0) == 0.0
    assert c.plan(keys, [10] * 8).k == [0] * 8


def test_failing_prompts_keep_a_longer_prefix_than_solved_ones():
    c = Curriculum(CurriculumConfig(probe_fraction=0.0, schedule="constant"))
    keys = ["easy", "hard", "mixed"]
    for _ in range(5):
        plan = c.plan(keys, [20, 20, 20])
        c.update(plan, [[1.0] * 4, [0.0] * 4, [1.0, 0.0, 0.0, 1.0]])
    plan = c.plan(keys + ["new"], [20] * 4)
    k = dict(zip(plan.keys, plan.k))
    assert k["hard"] == math.floor(0.9 * 20)  # all-failed (zero-variance) group keeps the full rho_t prefix
    assert k["hard"] > k["mixed"] > k["easy"]
    # an unseen prompt starts at the batch's level: the mean success EMA of the seen prompts
    level = sum(c.difficulty[x] for x in keys) / 3
    assert plan.difficulty[-1] == pytest.approx(level)


def test_lambda_fades_with_rho():
    c = Curriculum(CurriculumConfig(initial_familiarity=0.325))
    assert c.rho == pytest.approx(0.45)
    assert c.lambda_t(2.0) == pytest.approx(1.0)


@settings(max_examples=40, deadline=None)
@given(rewards=st.lists(st.lists(st.floats(0, 1), min_size=4, max_size=4), min_size=1, max_size=30),
       ratchet=st.booleans())
def test_ratchet_never_rises(rewards, ratchet):
    c = Curriculum(CurriculumConfig(ratchet=ratchet, probe_fraction=1.0, ema=0.5))
    rhos = [c.rho]
    for r in rewards:
        c.update(c.plan(["a"], [10]), [r])
        rhos.append(c.rho)
    if ratchet:
        assert all(b <= a for a, b in zip(rhos, rhos[1:]))
    else:  # without the ratchet rho follows familiarity exactly
        assert c.rho == pytest.approx(schedule_value(c.config, c.step, c.familiarity))


def _drive(c, steps, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        keys = torch.randint(0, 6, (4,), generator=g).tolist()
        keys = [f"q{k}" for k in dict.fromkeys(keys)]
        plan = c.plan(keys, torch.randint(1, 30, (len(keys),), generator=g).tolist())
        out.append((plan.k, plan.is_probe, c.update(plan, torch.rand(len(keys), 3, generator=g).tolist())))
    return out


@settings(max_examples=25, deadline=None)
@given(before=st.integers(0, 8), after=st.integers(1, 8), seed=st.integers(0, 100),
       schedule=st.sampled_from(["familiarity", "step_cosine"]))
def test_state_round_trip_continues_identically(before, after, seed, schedule):
    cfg = CurriculumConfig(schedule=schedule, decay_steps=10, settle_steps=2, ema=0.6, seed=seed)
    a = Curriculum(cfg)
    _drive(a, before, seed)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = Curriculum(cfg)
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    assert b.state_dict() == a.state_dict()
    ra, rb = _drive(a, after, seed + 1), _drive(b, after, seed + 1)
    assert str(ra) == str(rb)  # str() so that nan metrics compare equal
    assert b.state_dict() == a.state_dict()


def test_bad_state_and_update_are_named():
    c = Curriculum()
    with pytest.raises(ValueError, match="missing keys \\['difficulty'\\]"):
        state = c.state_dict()
        del state["difficulty"]
        c.load_state_dict(state)
    plan = c.plan(["a", "b"], [3, 4])
    with pytest.raises(ValueError, match="prompt 'b' has a non-finite reward nan"):
        c.update(plan, [[1.0], [float("nan")]])
    with pytest.raises(ValueError, match="1 reward groups for 2 planned prompts"):
        c.update(plan, [[1.0]])
    c.update(plan, [[1.0], [0.0]])
    with pytest.raises(ValueError, match="plan is for step 0 but the curriculum is at step 1"):
        c.update(plan, [[1.0], [0.0]])
