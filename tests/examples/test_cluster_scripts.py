"""The Slurm scripts parse, their dry-run prints the torchrun command they would launch (from a spool copy too,
finding the repo through SLURM_SUBMIT_DIR), the configs they point to load and split their global batch over the
layout, and the Dockerfile installs this package (and the tested megatron-core) on top of the image's torch.
With srun/scontrol stand-ins on PATH: what the batch script launches (container flags only with CONTAINER_IMAGE,
--cpus-per-task, a per-node Triton cache), and that its USR1 trap creates the trainer's stop file, waits for the
step to end and only then requeues, while a run that ends by itself is not requeued. The same script under a real
Slurm: test_slurm.py."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import time

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
    # the file the script's USR1 trap creates is the one the trainer watches
    assert cfg.run.stop_file_path() == os.path.join(cfg.run.output_dir, "SAVE_AND_EXIT")
    assert os.path.isabs(cfg.run.stop_file_path())
    # data.prompts_per_step is global: the script's layout must split it into whole groups per DP rank
    world = int(nnodes) * int(argv[argv.index("--nproc_per_node") + 1])
    dp = world // (int(tp) * int(pp))
    assert world % (int(tp) * int(pp)) == 0 and cfg.data.prompts_per_step % dp == 0, (world, dp)
    rollouts_per_rank = cfg.data.prompts_per_step // dp * cfg.rcpa.group_size
    assert rollouts_per_rank % cfg.optim.micro_batch_size == 0, rollouts_per_rank
    assert f"layout: {nnodes} nodes x 8 = {world} ranks = TP {tp} x PP {pp} x DP {dp}" in r.stderr


def test_dockerfile_installs_the_package_on_an_ngc_image():
    text = open(os.path.join(ROOT, "Dockerfile")).read()
    assert "FROM ${BASE_IMAGE}" in text and "pytorch" in text
    assert 'pip install --no-cache-dir -e ".[wandb]"' in text
    installs = " ".join(line for line in text.splitlines() if "pip install" in line)
    assert "transformer-engine" not in installs and "torch==" not in installs  # both come from the image


def test_header_log_survives_submit_and_requeue():
    """The log goes to the job's working dir (a subdir would have to exist at submit time, or the job fails with
    no output at all) and is appended to, so a requeued job keeps the first run's log."""
    for script in SCRIPTS:
        header = [line for line in open(os.path.join(ROOT, "examples", script)) if line.startswith("#SBATCH")]
        output = [line.split("=", 1)[1].strip() for line in header if line.startswith("#SBATCH --output=")]
        assert output == ["%x-%j.out"], (script, output)
        assert "#SBATCH --open-mode=append\n" in header and "#SBATCH --requeue\n" in header, script
        assert "#SBATCH --signal=B:USR1@300\n" in header, script


def test_dockerfile_pins_the_tested_megatron_core():
    text = open(os.path.join(ROOT, "Dockerfile")).read()
    readme = open(os.path.join(ROOT, "README.md")).read()
    tested = readme[readme.index("<!-- test-command"):]  # the block .ci/run executes
    pinned = re.findall(r'"megatron-core==([0-9.]+)"', text)
    assert pinned == ["0.19.2"], pinned
    assert f'"megatron-core=={pinned[0]}"' in tested[:tested.index("```\n", 10)]  # the version the suite covers


@pytest.mark.parametrize("script", ["rcpa_70b.sh", "rcpa_7b.sh"])
def test_repo_dir_comes_from_the_submit_dir_not_the_spool_copy(script, tmp_path):
    """sbatch runs a copy of the script from its spool dir: the repo must come from SLURM_SUBMIT_DIR."""
    spool = tmp_path / "job00042"
    spool.mkdir()
    shutil.copy(os.path.join(ROOT, "examples", script), spool / "slurm_script")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "REPO_DIR"}
    env.update(DRY_RUN="1", SLURM_SUBMIT_DIR=ROOT)
    r = subprocess.run(["bash", str(spool / "slurm_script")], capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    config = shlex.split(r.stdout)[shlex.split(r.stdout).index("--config") + 1]
    assert os.path.dirname(config) == os.path.join(ROOT, "examples", "configs") and os.path.isfile(config)

    env.update(SLURM_SUBMIT_DIR=str(tmp_path))  # submitted from elsewhere: a clear error, not exit 127 later
    r = subprocess.run(["bash", str(spool / "slurm_script")], capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 2 and f"REPO_DIR={tmp_path} is not the megatron_rcpa repository" in r.stderr, r.stderr
    assert "export REPO_DIR" in r.stderr


# Stand-ins for srun/scontrol on PATH, to see what the batch script launches and when it requeues; the real
# thing is tests/examples/test_slurm.py (needs root and a Slurm install).
FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_LOG/srun.args"
echo "TRITON_CACHE_ROOT=$TRITON_CACHE_ROOT" > "$FAKE_LOG/srun.env"
touch "$FAKE_LOG/srun.started"
for _ in $(seq 300); do
  [[ -e "$FAKE_LOG/srun.release" || -e "$STOP_FILE_SEEN" ]] && break
  sleep 0.05
done
exit "${FAKE_SRUN_RC:-0}"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG/scontrol.calls"
if [[ "$1 $2" == "show hostnames" ]]; then echo node001; echo node002; fi
"""


def _batch_env(tmp_path, **extra):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("REPO_DIR", "TRITON_CACHE_ROOT", "CONTAINER_IMAGE")}
    env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", FAKE_LOG=str(tmp_path), SLURM_SUBMIT_DIR=ROOT,
               SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node[001-002]",
               SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="64", TP="8", PP="2", OUTPUT_DIR=str(out),
               STOP_FILE_SEEN=str(out / "SAVE_AND_EXIT"))
    env.update(extra)
    return env


def _wait_for(path, proc, timeout=20.0):
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("image", ["", "/images/megatron_rcpa.sqsh"])
def test_srun_line_and_no_requeue_on_a_normal_end(tmp_path, image):
    env = _batch_env(tmp_path, CONTAINER_IMAGE=image)
    p = subprocess.Popen(["bash", os.path.join(ROOT, "examples", "rcpa_70b.sh")], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "srun.started", p)
    (tmp_path / "srun.release").touch()
    stdout, stderr = p.communicate(timeout=30)
    assert p.returncode == 0, stderr
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert "--cpus-per-task=64" in args and "--ntasks-per-node=1" in args  # 22.05-23.02 do not inherit it
    container = [a for a in args if a.startswith("--container-")]
    if image:
        assert f"--container-image={image}" in args and f"--container-workdir={ROOT}" in args
    else:
        assert container == [] and f"--chdir={ROOT}" in args
    # each node sets its own TRITON_CACHE_DIR under TRITON_CACHE_ROOT, then runs torchrun
    launch = args.index("torchrun")
    assert args[launch - 4:launch - 2] == ["bash", "-c"] and "TRITON_CACHE_DIR=" in args[launch - 2]
    assert "SLURMD_NODENAME" in args[launch - 2]
    assert (tmp_path / "srun.env").read_text().strip() == "TRITON_CACHE_ROOT=/tmp/" + \
        f"{os.environ.get('USER', 'rcpa')}-triton-77"
    assert args[launch:launch + 5] == ["torchrun", "--nnodes", "2", "--nproc_per_node", "8"]
    assert "--rdzv_endpoint" in args and args[args.index("--rdzv_endpoint") + 1] == "node001:29500"
    calls = (tmp_path / "scontrol.calls").read_text()
    assert "requeue" not in calls, calls  # a run that ends on its own is not requeued


@pytest.mark.parametrize("srun_rc", [0, 1])
def test_usr1_creates_the_stop_file_waits_for_srun_then_requeues(tmp_path, srun_rc):
    env = _batch_env(tmp_path, FAKE_SRUN_RC=str(srun_rc))
    stop = tmp_path / "run" / "SAVE_AND_EXIT"
    (tmp_path / "run").mkdir()
    stop.touch()  # left over from the run before a requeue: must not stop this one at once
    p = subprocess.Popen(["bash", os.path.join(ROOT, "examples", "rcpa_70b.sh")], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "srun.started", p)
    assert not stop.exists()
    time.sleep(0.3)
    assert p.poll() is None and not (tmp_path / "scontrol.calls").read_text().count("requeue")
    p.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 / scancel --signal=USR1 --batch deliver
    stdout, stderr = p.communicate(timeout=30)  # the fake srun ends once the stop file appears
    assert p.returncode == srun_rc, stderr
    assert stop.exists(), "the trap must create the stop file the trainer watches"
    calls = (tmp_path / "scontrol.calls").read_text().splitlines()
    assert calls[-1] == "requeue 77", calls
    assert "asking the trainer to save and exit" in stdout and f"ended (exit {srun_rc})" in stdout, stdout
