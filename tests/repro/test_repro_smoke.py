"""CI smoke test of the reproduction's mechanics (issue 16), well under a minute: the tasks are deterministic;
GRPO (the ``grpo`` arm's settings) on a domain the model cannot reach has a zero-variance fraction of 1 and
leaves the weights unchanged; rho never rises under the ``rcpa`` arm's curriculum; D2's reward strips the
sign-off; the verdict applies the issue's rules."""

from __future__ import annotations

import json
import random

import pytest
import torch

from megatron_rcpa.repro import tasks
from megatron_rcpa.repro.arms import PRESETS, arms_for
from megatron_rcpa.repro.rewards import repro_reward


def test_tasks_are_deterministic_and_use_new_symbols_only_in_the_domain(tmp_path):
    a = tasks.make_split(tasks.general_sources(), 20, seed=3)
    b = tasks.make_split(tasks.general_sources(), 20, seed=3)
    assert a == b and len(a) == 100
    assert {r["data_source"] for r in a} == set(tasks.GENERAL_TASKS)
    held = tasks.make_split([("domain", tasks.d1().sample)], 30, seed=1)
    train = tasks.make_split([("domain", tasks.d1().sample)], 200, seed=2, exclude=[r["prompt"] for r in held])
    assert not {r["prompt"] for r in held} & {r["prompt"] for r in train}
    general_chars = {c for r in a for c in r["prompt"] + r["reference"]} | set("User: \nAssistant:")
    for dom in (tasks.d1(), tasks.d2()):
        assert not general_chars & set(dom.new_symbols)
        rows = tasks.make_split([("domain", dom.sample)], 10, seed=5)
        assert rows == tasks.make_split([("domain", dom.sample)], 10, seed=5)
        for r in rows:
            assert set(r["reference"]) <= set(dom.new_symbols)
    assert tasks.general_sample("rev", random.Random(0)) == tasks.general_sample("rev", random.Random(0))
    assert tasks.general_sample("inc", random.Random(1))[1] == "".join(
        str((int(c) + 1) % 10) for c in tasks.general_sample("inc", random.Random(1))[0].split()[1])
    # D1: reverse, then the fixed permutation
    perm = tasks._permutation()
    assert sorted(perm.values()) == sorted(tasks.DOMAIN_ALPHABET)
    assert tasks._d1_sample(random.Random(9))[1] == "".join(perm[c] for c in reversed(
        tasks._d1_sample(random.Random(9))[0].split()[1]))


def test_d2_reward_strips_the_sign_off():
    dom = tasks.d2()
    prompt, ref = dom.sample(random.Random(4))
    answer = ref[: -len(tasks.SIGN_OFF)]
    assert ref.endswith(tasks.SIGN_OFF) and len(tasks.SIGN_OFF) == 3
    assert dom.reward(ref, ref) == 1.0
    assert dom.reward(answer, ref) == 1.0  # the sign-off is not rewarded ...
    assert dom.reward(answer + "#QQ", ref) == 0.0  # ... and only the sign-off is stripped
    assert dom.reward(answer[:-1] + tasks.SIGN_OFF, ref) == 0.0
    # through the trainer's reward, by data source: the same reference text is a domain or a general answer
    out = repro_reward([answer, answer, "123"], [ref, ref, "123"], domain="d2",
                       data_sources=["domain", "copy", "copy"])
    assert out == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="data_source"):
        repro_reward([answer], [ref], domain="d2")


def test_rho_never_rises_under_the_rcpa_arm():
    from megatron_rcpa.algo.curriculum import Curriculum
    from megatron_rcpa.train.config import load_config

    arm = {a.name: a for a in arms_for(PRESETS["cpu"])}["rcpa"]
    cfg = load_config(None, list(arm.overrides))
    cur = Curriculum(cfg.rcpa.curriculum)
    gen = torch.Generator().manual_seed(0)
    rhos = [cur.rho]
    for step in range(120):  # success rises, then collapses: rho follows it down, never back up
        p = min(1.0, step / 60) if step < 90 else 0.0
        keys = [f"k{(step * 8 + i) % 40}" for i in range(8)]
        plan = cur.plan(keys, [6] * 8)
        cur.update(plan, [[float(torch.rand(1, generator=gen) < p) for _ in range(8)] for _ in keys])
        rhos.append(cur.rho)
    assert all(b <= a for a, b in zip(rhos, rhos[1:]))
    assert rhos[0] == pytest.approx(0.9) and rhos[-1] == 0.0


def _grpo_worker(data: str) -> dict:
    from megatron_rcpa.train.config import load_config
    from megatron_rcpa.train.trainer import Trainer

    arm = {a.name: a for a in arms_for(PRESETS["cpu"])}["grpo"]
    cfg = load_config(None, [
        "model.family=llama", "model.tiny=true", "model.tiny_hidden_size=32", "model.tiny_num_layers=1",
        f"data.path={data}", "data.prompts_per_step=4", "rcpa.group_size=4", "optim.micro_batch_size=16",
        "rollout.max_new_tokens=6", "optim.lr=0.01", "run.progress_bar=false", "logging.tensorboard=false",
        "run.output_dir=/nonexistent-never-written", "run.steps=3",
        "reward.name=megatron_rcpa.repro.rewards:repro_reward", "reward.kwargs.domain=d1", *arm.overrides])
    tr = Trainer(cfg)
    before = {k: v.detach().clone() for k, v in tr.model.module.state_dict().items() if torch.is_tensor(v)}
    hist = [tr.train_one_step() for _ in range(3)]
    after = tr.model.module.state_dict()
    diff = max(float((after[k].float() - v.float()).abs().max()) for k, v in before.items() if v.numel())
    return {"zv": [m["zero_var_frac"] for m in hist], "reward": [m["reward"] for m in hist],
            "rho": [m["rho"] for m in hist], "lambda": [m["lambda_t"] for m in hist],
            "k": [m["mean_k_over_l"] for m in hist], "diff": diff}


@pytest.mark.multiproc
@pytest.mark.megatron
def test_grpo_on_an_unreachable_domain_has_no_signal_and_keeps_the_weights(tmp_path):
    from megatron_rcpa.testing import run_distributed

    rows = tasks.make_split([("domain", tasks.d1().sample)], 16, seed=0)
    data = tmp_path / "d1.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (res,) = run_distributed(_grpo_worker, world_size=1, args=(str(data),), timeout=120.0)
    assert res["zv"] == [1.0, 1.0, 1.0]
    assert res["reward"] == [0.0, 0.0, 0.0]
    assert res["rho"] == [0.0, 0.0, 0.0] and res["lambda"] == [0.0, 0.0, 0.0] and res["k"] == [0.0, 0.0, 0.0]
    assert res["diff"] == 0.0
