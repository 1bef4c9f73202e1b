"""The verdict applies issue 16's rules: R(tau) at the first evaluation reaching tau, C1-C5, and the outcome
order (invalid toy, reproduced, refuted, partly, not reproduced); the bootstrap is paired over samples."""

from __future__ import annotations

import math

from megatron_rcpa.repro.analysis import ArmResult, EvalPoint
from megatron_rcpa.repro.verdict import bootstrap_diff, domain_verdict


def _run(arm: str, curve, zv: float = math.nan, n: int = 50, seed: int = 0) -> ArmResult:
    """``curve``: [(step, domain_acc, general_acc)]; per-sample successes realise general_acc exactly."""
    evals = []
    for step, dom, gen in curve:
        k = round(gen * n)
        evals.append(EvalPoint(step=step, domain_acc=dom, general_acc=k / n, per_task={"copy": k / n}, leak=0.0,
                               sign_off_rate=None, general_success=[1.0] * k + [0.0] * (n - k),
                               domain_success=[]))
    steps = [s for s, _, _ in curve if s > 0]
    train = {"zero_var_frac": [zv] * len(steps), "reward": [0.0] * len(steps), "rho": [0.0] * len(steps)}
    return ArmResult(domain="d1", arm=arm, seed=seed, evals=evals, steps=steps, train=train, wall_s=1.0,
                     gen_tokens=0.0, seq_tokens=0.0)


BASE = 0.98
GRPO = _run("grpo", [(0, 0.0, 0.98), (10, 0.0, 0.98), (20, 0.0, 0.98)], zv=1.0)
SFT = _run("sft", [(0, 0.0, 0.98), (10, 0.5, 0.6), (20, 0.95, 0.3), (30, 1.0, 0.1)])


def test_reproduced_when_rcpa_retains_clearly_more():
    rcpa = _run("rcpa", [(0, 0.0, 0.98), (10, 0.4, 0.9), (20, 0.92, 0.8)])
    fixed = _run("fixed_rho", [(0, 0.0, 0.98), (10, 0.3, 0.9), (20, 0.5, 0.8), (30, 0.9, 0.7)])
    v = domain_verdict({"sft": [SFT], "grpo": [GRPO], "rcpa": [rcpa], "fixed_rho": [fixed]}, BASE)
    c = v["criteria"]
    assert c["C3"]["R_sft"] == 0.3 and c["C4"]["R_rcpa"] == 0.8  # first eval at tau, not the best one
    assert c["C4"]["bootstrap"]["lo"] > 0 and c["C4"]["diff"] == 0.5
    assert c["C5"]["pass"] and c["C5"]["steps_rcpa"] == 20 and c["C5"]["steps_fixed"] == 30
    assert v["outcome"] == "reproduced"


def test_invalid_toy_when_grpo_does_not_collapse_or_sft_does_not_forget():
    rcpa = _run("rcpa", [(0, 0.0, 0.98), (20, 0.95, 0.9)])
    grpo = _run("grpo", [(0, 0.0, 0.98), (20, 0.2, 0.98)], zv=0.6)
    assert domain_verdict({"sft": [SFT], "grpo": [grpo], "rcpa": [rcpa]}, BASE)["outcome"] == "invalid toy"
    kind_sft = _run("sft", [(0, 0.0, 0.98), (20, 0.95, 0.9)])
    v = domain_verdict({"sft": [kind_sft], "grpo": [GRPO], "rcpa": [rcpa]}, BASE)
    assert v["outcome"] == "invalid toy" and not v["criteria"]["C3"]["pass"]


def test_refuted_partly_and_not_reproduced():
    worse = _run("rcpa", [(0, 0.0, 0.98), (20, 0.95, 0.1)])
    sft = _run("sft", [(0, 0.0, 0.98), (20, 0.95, 0.5)])
    assert domain_verdict({"sft": [sft], "grpo": [GRPO], "rcpa": [worse]}, BASE)["outcome"] == "refuted"
    close = _run("rcpa", [(0, 0.0, 0.98), (20, 0.95, 0.55)])
    assert domain_verdict({"sft": [sft], "grpo": [GRPO], "rcpa": [close]}, BASE)["outcome"] == "partly"
    never = _run("rcpa", [(0, 0.0, 0.98), (20, 0.0, 0.0)])
    v = domain_verdict({"sft": [sft], "grpo": [GRPO], "rcpa": [never]}, BASE)
    assert v["outcome"] == "not reproduced" and not v["criteria"]["C2"]["pass"]
    assert v["criteria"]["C4"]["R_rcpa"] is None


def test_best_sft_lr_is_the_comparison_and_the_bootstrap_is_paired():
    rcpa = _run("rcpa", [(0, 0.0, 0.98), (20, 0.95, 0.6)])
    gentle = _run("sft_lr0.3", [(0, 0.0, 0.98), (20, 0.95, 0.55)])
    v = domain_verdict({"sft": [SFT], "sft_lr0.3": [gentle], "grpo": [GRPO], "rcpa": [rcpa]}, BASE)
    assert v["criteria"]["C4"]["best_sft_arm"] == "sft_lr0.3" and not v["criteria"]["C4"]["pass"]
    same = bootstrap_diff([rcpa], [rcpa])
    assert same["diff"] == 0.0 and same["lo"] == 0.0 == same["hi"]  # paired: identical answers, no spread
