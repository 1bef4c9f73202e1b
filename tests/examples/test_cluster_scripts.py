"""The Slurm scripts parse, their dry-run prints the torchrun command they would launch, the configs they
point to load, and the Dockerfile installs this package on top of the image's torch."""

import os
import shlex
import subprocess

import pytest

from megatron_rcpa.train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".sh"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", os.path.join(ROOT, "examples", script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script, nnodes, tp, pp", [("rcpa_70b.sh", "4", "8", "4"), ("rcpa_7b.sh", "1", "2", "1")])
def test_dry_run_prints_the_torchrun_command(script, nnodes, tp, pp):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(DRY_RUN="1", EXTRA_ARGS="run.steps=3")
    r = subprocess.run(["bash", os.path.join(ROOT, "examples", script)], capture_output=True, text=True, env=env,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout)
    assert argv[:3] == ["torchrun", "--nnodes", nnodes] and argv[argv.index("--nproc_per_node") + 1] == "8"
    assert argv[argv.index("-m") + 1] == "megatron_rcpa.train"
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    assert f"parallel.tp={tp}" in overrides and f"parallel.pp={pp}" in overrides
    assert "run.resume=auto" in overrides and overrides[-1] == "run.steps=3"
    config = argv[argv.index("--config") + 1]
    cfg = load_config(config, overrides)  # every override the script passes is a valid option
    assert cfg.parallel.tp == int(tp) and cfg.run.steps == 3 and cfg.model.dtype == "bf16"


def test_dockerfile_installs_the_package_on_an_ngc_image():
    text = open(os.path.join(ROOT, "Dockerfile")).read()
    assert "FROM ${BASE_IMAGE}" in text and "pytorch" in text
    assert 'pip install --no-cache-dir -e ".[wandb]"' in text
    installs = " ".join(line for line in text.splitlines() if "pip install" in line)
    assert "transformer-engine" not in installs and "torch==" not in installs  # both come from the image
