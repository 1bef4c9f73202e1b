"""Resuming a trainer checkpoint never executes its metadata: a planted pickle in optimizer/.metadata (or the
policy's model/.metadata) is refused with one error line naming the file, exit 2, and the planted code does not
run."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest

from megatron_rcpa.testing.hostile import RunsCommand

pytestmark = [pytest.mark.megatron]


def _cmd(out: str, steps: int):
    return [sys.executable, "-m", "megatron_rcpa.train", "--config", "examples/configs/tiny_cpu.yaml",
            f"run.output_dir={out}", f"run.steps={steps}", "run.save_interval=1", "run.progress_bar=false",
            "data.synthetic_size=8", "data.prompts_per_step=2", "rollout.max_new_tokens=4", "rcpa.group_size=2",
            "optim.micro_batch_size=2", "logging.tensorboard=false", "run.val_before_train=false",
            "run.val_interval=0", "data.val_synthetic_size=0"]


@pytest.mark.parametrize("part", ["optimizer", os.path.join("policy", "model")])
def test_resume_refuses_a_planted_pickle(tmp_path, part):
    out = str(tmp_path / "run")
    subprocess.run(_cmd(out, 1), check=True, capture_output=True, timeout=300)
    marker = tmp_path / "pwned"
    target = os.path.join(out, "checkpoints", "step_0000001", part, ".metadata")
    assert os.path.isfile(target)
    with open(target, "wb") as f:
        pickle.dump(RunsCommand(f"touch {marker}"), f)
    proc = subprocess.run(_cmd(out, 2), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("rcpa-train: error:")]
    assert len(errors) == 1 and ".metadata" in errors[0] and "Traceback" not in proc.stderr
    assert not marker.exists()  # the planted code never ran
