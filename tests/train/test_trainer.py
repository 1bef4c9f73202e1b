"""The RCPA trainer end to end on the tiny Qwen2.5-VL-style policy (synthetic counting domain): a resumed
run takes the identical next step at TP=1, TP=2 and PP=2; rollouts keep the forced prefix verbatim; the
CLI names bad options; rcpa-plot writes its PNGs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_rcpa.testing import run_distributed
from megatron_rcpa.train.config import load_config

pytestmark = [pytest.mark.multiproc, pytest.mark.megatron]

TIMEOUT = 300.0
COMPARED = ("loss", "reward", "imit_nll", "entropy", "grad_norm", "rho", "familiarity", "kl_ref")


def _cfg(out: str, steps: int, **extra):
    overrides = [f"run.output_dir={out}", f"run.steps={steps}", "run.save_interval=2", "run.progress_bar=false",
                 "data.synthetic_size=16", "data.prompts_per_step=2", "rollout.max_new_tokens=6",
                 "optim.micro_batch_size=2", "rcpa.group_size=2", "rcpa.loss.beta=0.05",
                 "rcpa.curriculum.probe_fraction=0.5", "logging.tensorboard=false"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config("examples/configs/tiny_cpu.yaml", overrides)


def train_worker(out: str, steps: int) -> list:
    from megatron_rcpa.train.trainer import Trainer

    return Trainer(_cfg(out, steps)).fit()


def _records(out: str) -> dict:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


@pytest.mark.parametrize("layout", [dict(world_size=1), dict(world_size=2, tp=2), dict(world_size=2, pp=2)],
                         ids=["tp1", "tp2", "pp2"])
def test_resumed_run_takes_the_identical_next_step(tmp_path, layout):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_distributed(train_worker, args=(straight, 3), timeout=TIMEOUT, **layout)
    run_distributed(train_worker, args=(resumed, 2), timeout=TIMEOUT, **layout)  # saves at step 2, stops
    assert open(os.path.join(resumed, "latest")).read().strip() == "step_0000002"
    run_distributed(train_worker, args=(resumed, 3), timeout=TIMEOUT, **layout)  # resumes from step 2
    a, b = _records(straight), _records(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for key in COMPARED:
        assert b[3][key] == pytest.approx(a[3][key], rel=1e-6, abs=1e-9), key
    assert a[3]["loss"] != a[2]["loss"]  # the steps differ: the comparison is not vacuous
    ckpt = os.path.join(resumed, "checkpoints", "step_0000003")
    assert os.path.isfile(os.path.join(ckpt, "trainer_state.json"))
    assert not any(n.endswith(".incomplete") for n in os.listdir(os.path.join(resumed, "checkpoints")))


def rollout_worker() -> list:
    from megatron_rcpa.data.synthetic import make_synthetic_dataset
    from megatron_rcpa.rollout.engine import RolloutEngine, SamplingParams
    from megatron_rcpa.rollout.sampling import StopChecker
    from megatron_rcpa.train.families import adapter_for
    from megatron_rcpa.train.trainer import build_policy, build_tokenizer_and_config

    cfg = _cfg("/tmp/unused", 1, **{"data.synthetic_reference": "full"})
    tok, hf = build_tokenizer_and_config(cfg)
    policy = build_policy(cfg, hf)
    fmt = adapter_for(cfg.model.family, tok, hf)
    prompts = [fmt(s) for s in make_synthetic_dataset("counting", 3, seed=0)]
    engine = RolloutEngine(policy, vocab_size=policy.vocab_size, pad_id=tok.pad_token_id,
                           stop=StopChecker([tok.eos_token_id]), params=SamplingParams(max_new_tokens=5),
                           banned_token_ids=fmt.structural_ids())
    ks = [0, 7, len(prompts[2].reference_ids) - 1]
    rollouts = engine.generate(prompts, ks, group_size=2, step=0)
    return [(r.prompt_id, r.prompt_tokens, r.prefix_tokens, r.generated_tokens, r.rollout_logp,
             prompts[r.prompt_id].prompt_ids, prompts[r.prompt_id].reference_ids, ks[r.prompt_id], tok.decode(
                 r.prefix_tokens)) for r in rollouts]


def test_rollouts_keep_the_forced_prefix_verbatim():
    rows = run_distributed(rollout_worker, world_size=1, timeout=TIMEOUT)[0]
    assert [r[0] for r in rows] == [0, 0, 1, 1, 2, 2]
    for _pid, prompt, prefix, gen, logp, prompt_ids, ref_ids, k, _text in rows:
        assert prompt == prompt_ids and prefix == ref_ids[:k]
        assert 1 <= len(gen) <= 5 and len(logp) == len(gen) and all(lp <= 0 for lp in logp)
    assert rows[2][8] == "There a"  # the first 7 characters of "There are ..." (character tokenizer)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "megatron_rcpa.train", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_help_lists_every_option_and_errors_name_the_bad_key(tmp_path):
    h = _cli("--help")
    assert h.returncode == 0
    for text in ("rcpa.curriculum.rho_max = 0.9", "run.steps = 100", "model.tiny = False", "--print-config"):
        assert text in h.stdout
    bad = _cli("--config", "examples/configs/tiny_cpu.yaml", "run.stepz=3")
    assert bad.returncode == 2 and "tiny_cpu.yaml.run: unknown key 'stepz'" in bad.stderr
    bad = _cli("--config", "examples/configs/tiny_cpu.yaml", "rcpa.curriculum.rho_max=1.5")
    assert bad.returncode == 2 and "rho_max = 1.5 is out of range" in bad.stderr
    missing = _cli("--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "nope.yaml' does not exist" in missing.stderr
    shown = _cli("--config", "examples/configs/tiny_cpu.yaml", "--print-config", "run.steps=7")
    assert shown.returncode == 0 and "steps: 7" in shown.stdout


def test_plot_writes_pngs(tmp_path):
    from megatron_rcpa.train.plot import main as plot_main

    run = tmp_path / "run"
    run.mkdir()
    recs = [{"step": s, "reward": 0.1 * s, "rho": 0.9 - 0.1 * s, "familiarity": 0.05 * s, "zero_var_frac": 0.5,
             "entropy": 3.0, "kl_ref": 0.01, "phase_name": "pre_alignment"} for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert plot_main([str(run)]) == 0
    names = sorted(os.listdir(run / "plots"))
    assert names == sorted(f"{n}.png" for n in ("reward", "rho", "familiarity", "zero_var_frac", "entropy", "kl"))
    with open(run / "plots" / "reward.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert plot_main([str(tmp_path / "empty")]) == 2
    assert torch.tensor(0.0).item() == 0.0


def test_checkpoint_resumes_at_another_layout(tmp_path):
    """Saved at TP=1, resumed at TP=2: policy, optimizer, curriculum and data cursor reshard and training goes on
    from the saved step with the same curriculum state."""
    out = str(tmp_path / "run")
    run_distributed(train_worker, args=(out, 2), world_size=1, timeout=TIMEOUT)
    history = run_distributed(train_worker, args=(out, 3), world_size=2, tp=2, timeout=TIMEOUT)[1]
    assert len(history) == 1  # only step 3 ran: steps 1-2 came from the checkpoint
    recs = _records(out)
    assert sorted(recs) == [1, 2, 3] and recs[3]["rho"] <= recs[2]["rho"]
    assert recs[3]["loss"] == pytest.approx(history[0]["loss"]) and recs[3]["update_ok"] == 1.0


def _train_cmd(out: str, steps: int):
    return [sys.executable, "-m", "megatron_rcpa.train", "--config", "examples/configs/tiny_cpu.yaml",
            f"run.output_dir={out}", f"run.steps={steps}", "run.save_interval=2", "run.progress_bar=false",
            "data.synthetic_size=16", "data.prompts_per_step=2", "rollout.max_new_tokens=6", "rcpa.group_size=2",
            "optim.micro_batch_size=2", "logging.tensorboard=false"]


def test_kill_9_then_resume_takes_the_identical_next_step(tmp_path):
    import signal
    import time

    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    subprocess.run(_train_cmd(straight, 6), check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(_train_cmd(killed, 6), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = os.path.join(killed, "latest")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(latest) and open(latest).read().strip() >= "step_0000002":
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # wherever it is: mid-step, or mid-way through writing a checkpoint
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed: the test proves nothing"
    subprocess.run(_train_cmd(killed, 6), check=True, capture_output=True, timeout=300)
    a, b = _records(straight), _records(killed)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in range(3, 7):
        for key in (k for k in COMPARED if k != "kl_ref"):  # beta = 0 in this config: no reference model
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-6, abs=1e-9), (step, key)
