"""Trainer checkpoints that survive failure (train/checkpointing.py, train/guard.py): the distributed optimizer
saves and resumes (DP2, TP2xDP2) to the identical next step; resume takes the newest complete checkpoint whatever
``latest`` says; a same-step checkpoint is replaced only once the new one is in place; leftovers of a crashed save
go; ``run.keep_last``; a non-finite update is skipped, counted and never saved; metrics rows stay unique."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from megatron_rcpa.testing import run_distributed
from megatron_rcpa.train import checkpointing as ckpt
from megatron_rcpa.train.config import load_config

TIMEOUT = 300.0
COMPARED = ("loss", "reward", "imit_nll", "entropy", "grad_norm", "rho", "familiarity", "kl_ref")


def _cfg(out: str, steps: int, *extra: str):
    overrides = [f"run.output_dir={out}", f"run.steps={steps}", "run.save_interval=2", "run.progress_bar=false",
                 "data.synthetic_size=16", "data.prompts_per_step=2", "rollout.max_new_tokens=6",
                 "optim.micro_batch_size=2", "rcpa.group_size=2", "rcpa.loss.beta=0.05",
                 "rcpa.curriculum.probe_fraction=0.5", "logging.tensorboard=false", *extra]
    return load_config("examples/configs/tiny_cpu.yaml", overrides)


def train_worker(out: str, steps: int, extra: tuple = ()) -> list:
    from megatron_rcpa.train.trainer import Trainer

    return Trainer(_cfg(out, steps, *extra)).fit()


def _records(out: str) -> dict:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"duplicated metrics rows: {steps}"
    return {r["step"]: r for r in rows}


# ------------------------------------------------------------------------------------ distributed optimizer
@pytest.mark.multiproc
@pytest.mark.megatron
@pytest.mark.parametrize("layout", [dict(world_size=2), dict(world_size=4, tp=2)], ids=["dp2", "tp2xdp2"])
def test_distributed_optimizer_save_kill_resume_takes_the_identical_next_step(tmp_path, layout):
    extra = ("parallel.distributed_optimizer=true", f"parallel.tp={layout.get('tp', 1)}")
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_distributed(train_worker, args=(straight, 3, extra), timeout=TIMEOUT, **layout)
    run_distributed(train_worker, args=(resumed, 2, extra), timeout=TIMEOUT, **layout)  # saves step 2; processes end
    state = ckpt.read_state(ckpt.checkpoint_dir(resumed, 2))
    assert state["layout"]["optimizer_format"] == "dp_reshardable" and state["layout"]["dp"] == 2
    history = run_distributed(train_worker, args=(resumed, 3, extra), timeout=TIMEOUT, **layout)[-1]
    assert len(history) == 1  # only step 3 ran
    a, b = _records(straight), _records(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for key in COMPARED:
        assert b[3][key] == pytest.approx(a[3][key], rel=1e-6, abs=1e-9), key
    assert a[3]["loss"] != a[2]["loss"]


# ------------------------------------------------------------------------------------- resume / publishing
def _fake_checkpoint(out: str, step: int, complete: bool = True) -> str:
    path = ckpt.checkpoint_dir(out, step)
    os.makedirs(os.path.join(path, "policy"))
    os.makedirs(os.path.join(path, "optimizer"))
    if complete:
        with open(os.path.join(path, ckpt.STATE_FILE), "w") as f:
            json.dump({"step": step}, f)
    return path


def test_resume_scan_takes_the_newest_complete_checkpoint_whatever_latest_says(tmp_path):
    out = str(tmp_path)
    assert ckpt.find_resume_checkpoint(out) == (None, None)
    _fake_checkpoint(out, 2)
    four = _fake_checkpoint(out, 4)
    _fake_checkpoint(out, 6, complete=False)  # killed while writing trainer_state.json
    os.makedirs(ckpt.checkpoint_dir(out, 8) + ckpt.INCOMPLETE_SUFFIX)
    found, note = ckpt.find_resume_checkpoint(out)  # no `latest` at all
    assert found == four and "latest is missing" in note and "step_0000004" in note
    with open(os.path.join(out, "latest"), "w") as f:
        f.write("step_0000010")  # a deleted step
    found, note = ckpt.find_resume_checkpoint(out)
    assert found == four and "names 'step_0000010'" in note
    with open(os.path.join(out, "latest"), "w") as f:
        f.write("step_0000004")
    assert ckpt.find_resume_checkpoint(out) == (four, None)


def test_publish_replaces_a_same_step_checkpoint_only_once_the_new_one_is_in_place(tmp_path):
    out = str(tmp_path)
    old = _fake_checkpoint(out, 3)
    with open(os.path.join(old, "policy", "marker"), "w") as f:
        f.write("old")
    tmp = old + ckpt.INCOMPLETE_SUFFIX
    shutil.copytree(old, tmp)
    with open(os.path.join(tmp, "policy", "marker"), "w") as f:
        f.write("new")
    ckpt.publish(tmp, old, out)
    assert open(os.path.join(old, "policy", "marker")).read() == "new"
    assert sorted(os.listdir(ckpt.checkpoints_root(out))) == ["step_0000003"]
    assert open(os.path.join(out, "latest")).read() == "step_0000003"
    # a crash between the two renames leaves the old one aside: it is put back (or dropped once replaced)
    os.rename(old, old + ckpt.REPLACED_SUFFIX)
    ckpt.remove_leftovers(out)
    assert ckpt.is_complete(old) and not os.path.exists(old + ckpt.REPLACED_SUFFIX)


def test_leftovers_and_keep_last(tmp_path):
    out = str(tmp_path)
    for s in (1, 2, 3, 4):
        _fake_checkpoint(out, s)
    os.makedirs(ckpt.checkpoint_dir(out, 5) + ckpt.INCOMPLETE_SUFFIX)
    assert [os.path.basename(p) for p in ckpt.remove_leftovers(out)] == ["step_0000005.incomplete"]
    assert ckpt.prune(out, 0, protect=ckpt.checkpoint_dir(out, 4)) == []
    removed = ckpt.prune(out, 2, protect=ckpt.checkpoint_dir(out, 4))
    assert [os.path.basename(p) for p in removed] == ["step_0000001", "step_0000002"]
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [3, 4]


@pytest.mark.multiproc
@pytest.mark.megatron
def test_resume_without_latest_keep_last_and_leftover_cleanup_end_to_end(tmp_path):
    out = str(tmp_path / "run")
    extra = ("run.save_interval=1", "run.keep_last=2")
    run_distributed(train_worker, args=(out, 3, extra), world_size=1, timeout=TIMEOUT)
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [2, 3]  # step 1 pruned
    os.remove(os.path.join(out, "latest"))  # lost: must not restart at step 0
    os.makedirs(ckpt.checkpoint_dir(out, 9) + ckpt.INCOMPLETE_SUFFIX)  # a crashed save's leftover
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "loss": 1.0}\n{"step": 5, "lo')  # a row past the checkpoint, then a torn line
    history = run_distributed(train_worker, args=(out, 4, extra), world_size=1, timeout=TIMEOUT)[0]
    assert len(history) == 1  # resumed from step 3, not from 0
    assert sorted(_records(out)) == [1, 2, 3, 4] and _records(out)[4]["loss"] != 1.0
    names = sorted(os.listdir(ckpt.checkpoints_root(out)))
    assert names == ["step_0000003", "step_0000004"]
    assert open(os.path.join(out, "latest")).read() == "step_0000004"


# --------------------------------------------------------------------------------------- non-finite updates
def nan_worker(out: str, nan_steps: tuple, steps: int, extra: tuple = ()) -> dict:
    """Train with a NaN injected into one gradient during the steps in ``nan_steps`` (1-based)."""
    import torch

    from megatron_rcpa.train.trainer import Trainer

    t = Trainer(_cfg(out, steps, "rcpa.loss.beta=0", *extra))
    param = next(p for p in t.model.module.parameters() if p.requires_grad)
    param.register_hook(lambda g: g * float("nan") if t.step + 1 in nan_steps else g)
    snapshots = {}
    orig = t.train_one_step

    def step_and_snapshot():
        m = orig()
        snapshots[t.step] = [p.detach().clone() for p in t.model.module.parameters()]
        return m

    t.train_one_step = step_and_snapshot
    try:
        history = t.fit()
        error = None
    except Exception as e:  # noqa: BLE001 - the test inspects it
        history, error = None, f"{type(e).__name__}: {e}"
    same = {s: all(torch.equal(a, b) for a, b in zip(snapshots[s], snapshots[s - 1]))
            for s in snapshots if s - 1 in snapshots}
    finite = all(bool(torch.isfinite(p).all()) for p in t.model.module.parameters())
    return {"history": history, "error": error, "unchanged": same, "finite": finite}


@pytest.mark.multiproc
@pytest.mark.megatron
def test_a_non_finite_gradient_skips_the_update_and_training_goes_on(tmp_path):
    out = str(tmp_path / "run")
    r = run_distributed(nan_worker, args=(out, (2,), 4), world_size=1, timeout=TIMEOUT)[0]
    assert r["error"] is None and r["finite"]
    assert r["unchanged"] == {2: True, 3: False, 4: False}  # step 2's update was not applied
    recs = _records(out)
    assert [recs[s]["update_ok"] for s in (1, 2, 3, 4)] == [1.0, 0.0, 1.0, 1.0]
    assert [recs[s]["skipped_updates"] for s in (1, 2, 3, 4)] == [0.0, 1.0, 1.0, 1.0]
    assert recs[2]["grad_norm"] != recs[2]["grad_norm"]  # NaN: logged as measured
    assert ckpt.read_state(ckpt.checkpoint_dir(out, 4))["skipped_updates"] == 1


@pytest.mark.multiproc
@pytest.mark.megatron
def test_consecutive_non_finite_updates_stop_with_a_clear_error_and_nothing_bad_is_saved(tmp_path):
    out = str(tmp_path / "run")
    r = run_distributed(nan_worker, args=(out, (3, 4, 5, 6), 8, ("optim.max_skipped_updates=3",)), world_size=1,
                        timeout=TIMEOUT)[0]
    assert r["error"].startswith("NonFiniteUpdateError: 3 consecutive updates had a non-finite gradient norm "
                                 "(optim.max_skipped_updates=3), last at step 5"), r["error"]
    assert r["finite"]
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [2, 4]  # step 4 saved: its weights are step 2's
    assert sorted(_records(out)) == [1, 2, 3, 4, 5]


def corrupt_and_save_worker(out: str) -> str:
    import torch

    from megatron_rcpa.train.guard import NonFiniteUpdateError
    from megatron_rcpa.train.trainer import Trainer

    t = Trainer(_cfg(out, 1, "rcpa.loss.beta=0"))
    t.step = 1
    t.save()
    t.step = 2
    with torch.no_grad():
        next(t.model.module.parameters()).view(-1)[0] = float("inf")
    try:
        t.save()
    except NonFiniteUpdateError as e:
        return str(e)
    return "saved"


@pytest.mark.multiproc
@pytest.mark.megatron
def test_non_finite_weights_are_never_saved(tmp_path):
    out = str(tmp_path / "run")
    msg = run_distributed(corrupt_and_save_worker, args=(out,), world_size=1, timeout=TIMEOUT)[0]
    assert msg.startswith("refusing to save step 2: the weights hold NaN/inf (rank 0: "), msg
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [1]
    assert open(os.path.join(out, "latest")).read() == "step_0000001"


def test_cli_reports_the_non_finite_stop_in_one_line(tmp_path, monkeypatch, capsys):
    """The trainer's NonFiniteUpdateError (raised as the consecutive-skip test above shows) ends rcpa-train with
    one error line and exit 1, not a traceback."""
    import megatron_rcpa.train.trainer as trainer_mod
    from megatron_rcpa.train.cli import main
    from megatron_rcpa.train.guard import NonFiniteUpdateError

    def failing_run(cfg):
        raise NonFiniteUpdateError("3 consecutive updates had a non-finite gradient norm (...)")

    monkeypatch.setattr(trainer_mod, "run", failing_run)
    assert main(["--config", "examples/configs/tiny_cpu.yaml", f"run.output_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert err == "rcpa-train: error: 3 consecutive updates had a non-finite gradient norm (...)\n"
