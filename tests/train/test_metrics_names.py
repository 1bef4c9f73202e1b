"""Dashboard names, the stable wandb run id of an output dir, and one line for missing TE/apex."""

from __future__ import annotations

import subprocess
import sys

from megatron_rcpa.train.metrics_log import namespaced, wandb_run_id


def test_dashboard_names_group_the_spec_keys():
    assert [namespaced(k) for k in ("reward", "rho", "familiarity", "zero_var_frac", "loss", "imit_nll", "kl_ref",
                                    "grad_norm", "time_rollout", "response_length", "padding_frac",
                                    "memory_peak_gb", "val/reward", "something_new")] == [
        "reward/reward", "curriculum/rho", "curriculum/familiarity", "curriculum/zero_var_frac", "loss/loss",
        "loss/imit_nll", "loss/kl_ref", "optim/grad_norm", "timing/time_rollout", "rollout/response_length",
        "rollout/padding_frac", "memory/memory_peak_gb", "val/reward", "misc/something_new"]


def test_wandb_run_id_is_stable_per_output_dir(tmp_path):
    a = wandb_run_id(str(tmp_path), "my run")
    assert a == wandb_run_id(str(tmp_path), "renamed") and a.startswith("my-run-")  # a requeued job continues
    other = tmp_path / "other"
    other.mkdir()
    assert wandb_run_id(str(other), "my run") != a


def test_missing_te_and_apex_are_said_once():
    code = ("import warnings, sys; warnings.simplefilter('default');"
            "from megatron_rcpa.train.cli import quiet_missing_extras; quiet_missing_extras();"
            "import megatron.core.optimizer, megatron.core.distributed, megatron.core.models.gpt")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "not installed" in ln]
    assert len(lines) == 1 and lines[0].startswith("[rcpa] Transformer Engine and apex not installed"), lines
