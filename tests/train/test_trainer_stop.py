"""Stopping a real ``rcpa-train`` process early (train/stop.py): SIGUSR1 / SIGTERM, the stop file and the
wall-clock budget each make it finish the step, save it, print one stop line and exit 0; the rerun resumes from
that step with no duplicated metrics row."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from megatron_rcpa.train.stop import StopRequests

pytestmark = [pytest.mark.megatron]

STOP_RE = re.compile(r"\[rcpa\] stop requested \((?P<reason>[^)]*)\): saved step (?P<step>\d+), exiting")


def _cmd(out: str, steps: int, *extra: str):
    return [sys.executable, "-m", "megatron_rcpa.train", "--config", "examples/configs/tiny_cpu.yaml",
            f"run.output_dir={out}", f"run.steps={steps}", "run.save_interval=0", "run.progress_bar=false",
            "data.synthetic_size=16", "data.prompts_per_step=2", "rollout.max_new_tokens=6", "rcpa.group_size=2",
            "optim.micro_batch_size=2", "logging.tensorboard=false", *extra]


def _steps(out: str):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def _run_until(out: str, steps: int, trigger, *extra: str, after_step: int = 2):
    """Start rcpa-train, call ``trigger(proc)`` once it has logged ``after_step``; return (rc, stdout)."""
    proc = subprocess.Popen(_cmd(out, steps, *extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(f"step {after_step}/"):
                trigger(proc)
                break
        lines.extend(proc.stdout)
        rc = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, "".join(lines)


@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_signal_saves_the_current_step_and_exits_0_then_the_rerun_resumes(tmp_path, sig):
    out = str(tmp_path / "run")
    rc, text = _run_until(out, 500, lambda p: p.send_signal(getattr(signal, "SIG" + sig)))
    assert rc == 0, text
    m = STOP_RE.search(text)
    assert m and m.group("reason") == "SIG" + sig, text
    n = int(m.group("step"))
    assert 2 <= n < 500
    ckpt = os.path.join(out, "checkpoints", f"step_{n:07d}")
    assert os.path.isfile(os.path.join(ckpt, "trainer_state.json"))
    assert open(os.path.join(out, "latest")).read().strip() == f"step_{n:07d}"
    assert _steps(out) == list(range(1, n + 1))
    again = subprocess.run(_cmd(out, n + 2), capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"at step {n}" in again.stdout
    assert _steps(out) == list(range(1, n + 3))  # no step twice


def test_stop_file_saves_and_is_removed(tmp_path):
    out = str(tmp_path / "run")
    stop_file = tmp_path / "please_stop"

    rc, text = _run_until(out, 500, lambda p: stop_file.write_text(""), f"run.stop_file={stop_file}")
    assert rc == 0, text
    m = STOP_RE.search(text)
    assert m and m.group("reason") == f"stop file {stop_file}", text
    n = int(m.group("step"))
    assert os.path.isfile(os.path.join(out, "checkpoints", f"step_{n:07d}", "trainer_state.json"))
    assert not stop_file.exists()  # served: a requeued job does not stop at once


def test_default_stop_file_lives_in_output_dir(tmp_path):
    from megatron_rcpa.train.config import load_config

    cfg = load_config("examples/configs/tiny_cpu.yaml", [f"run.output_dir={tmp_path}"])
    assert cfg.run.stop_file_path() == os.path.join(str(tmp_path), "SAVE_AND_EXIT")
    assert load_config(None, ["run.stop_file="]).run.stop_file_path() is None
    assert load_config(None, ["run.save_signals=[]"]).run.save_signals == []
    with pytest.raises(ValueError, match="unknown signal 'USR3'"):
        load_config(None, ["run.save_signals=[USR1, USR3]"])
    with pytest.raises(ValueError, match="cannot be caught"):
        load_config(None, ["run.save_signals=[KILL]"])


def test_time_budget_saves_before_it_runs_out(tmp_path):
    import psutil

    out = str(tmp_path / "run")
    budget = 40.0  # start-up (imports, model) takes ~5-15 s here; the steps take ~0.1-1 s each
    # saving every step measures the save time from the start (the budget check uses it); keep_last bounds the disk
    proc = subprocess.Popen(_cmd(out, 100000, f"run.save_by_seconds={budget}", "run.save_interval=1",
                                 "run.keep_last=2"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = psutil.Process(proc.pid).create_time()  # what the budget counts from
    stop_at, lines = None, []
    try:
        for line in proc.stdout:
            lines.append(line)
            if STOP_RE.search(line):
                stop_at = time.time()  # printed after the save
        rc = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines)
    assert rc == 0, text
    m = STOP_RE.search(text)
    assert m and "run.save_by_seconds=40 nearly spent" in m.group("reason"), text
    assert stop_at - started < budget, text  # the save was done before the budget ran out
    n = int(m.group("step"))
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [f"step_{n - 1:07d}", f"step_{n:07d}"]


def test_budget_check_uses_the_measured_step_and_save_times():
    s = StopRequests(signals=[], save_by_seconds=100.0, start_time=time.time() - 90.0)
    assert s.check() is None  # nothing measured yet: 10 s left is plenty
    s.record_step_time(4.0)
    assert s.check() is None  # one step (4 s) + a save guessed as long as a step (4 s) still fits in 10 s
    s.record_save_time(7.0)
    assert s.check() == "run.save_by_seconds=100 nearly spent"  # 4 + 7 > 10


def test_signal_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    s = StopRequests(signals=["USR1"]).install()
    assert signal.getsignal(signal.SIGUSR1) != before
    os.kill(os.getpid(), signal.SIGUSR1)
    assert s.check() == "SIGUSR1"
    s.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before


def signal_one_rank_worker(out: str) -> tuple:
    import torch

    from megatron_rcpa.train.config import load_config
    from megatron_rcpa.train.trainer import Trainer

    cfg = load_config("examples/configs/tiny_cpu.yaml", [
        f"run.output_dir={out}", "run.steps=50", "run.save_interval=0", "run.progress_bar=false",
        "data.synthetic_size=16", "data.prompts_per_step=2", "rollout.max_new_tokens=6", "rcpa.group_size=2",
        "optim.micro_batch_size=2", "logging.tensorboard=false"])
    t = Trainer(cfg)
    orig = t.train_one_step

    def step():
        m = orig()
        if t.step == 2 and torch.distributed.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGUSR1)  # only rank 0 is told
        return m

    t.train_one_step = step
    history = t.fit()
    return len(history), t.step


@pytest.mark.multiproc
def test_all_ranks_stop_after_the_same_step_when_only_one_got_the_signal(tmp_path):
    from megatron_rcpa.testing import run_distributed

    out = str(tmp_path / "run")
    results = run_distributed(signal_one_rank_worker, args=(out,), world_size=2, timeout=300)
    assert results == [(2, 2), (2, 2)]
    assert open(os.path.join(out, "latest")).read().strip() == "step_0000002"
    assert _steps(out) == [1, 2]
