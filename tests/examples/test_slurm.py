"""The real ``examples/rcpa_7b.sh`` (which runs ``rcpa_70b.sh``) under a real Slurm.

A one-node cluster on this machine: Debian's ``slurmctld``/``slurmd`` 22.05 (installed with apt-get when
missing), started by hand from a ``slurm.conf`` in a fresh temp dir, 8 GPUs faked as GRES on ``mknod``
character devices. The job is the unmodified script, submitted with ``sbatch`` from the repository root
(so the script must find the repo from ``SLURM_SUBMIT_DIR``: sbatch runs a spool copy), and shrunk only
through the environment and trailing ``key=value`` overrides: the tiny CPU config, one process, no
container. One job shows everything: a ``scancel --signal=USR1 --batch`` mid-run makes the trainer save and
exit, the script requeue the job, and the rerun resume from that step and finish; the log (one file in the
job's working dir, appended to) keeps both runs; ``metrics.jsonl`` holds every step once; the finished job is
not requeued again.

Needs root (slurmd runs the job as root with ``auth/none``; mknod). Skips with the reason otherwise; with
``RCPA_REQUIRE_SLURM=1`` (set by ``.ci/run``) a missing prerequisite fails instead of skipping.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "scancel", "scontrol", "squeue", "sinfo")
STEPS = 10  # a tiny-model step takes 0.3-1 s on a CPU: the USR1 (after step 1) lands with steps to spare

pytestmark = [pytest.mark.slurm, pytest.mark.megatron, pytest.mark.timeout(170)]


def _unavailable(reason: str):
    if os.environ.get("RCPA_REQUIRE_SLURM") == "1":
        pytest.fail(f"RCPA_REQUIRE_SLURM=1 but the Slurm test cannot run: {reason}")
    pytest.skip(reason)


def _ensure_slurm_installed() -> None:
    if all(shutil.which(b) for b in DAEMONS + CLIENTS):
        return
    if shutil.which("apt-get") is None:
        _unavailable("slurmctld/slurmd/sbatch are not installed and there is no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurmctld", "slurmd", "slurm-client"]
    r = subprocess.run(install, capture_output=True, text=True, env=env, timeout=120)
    if r.returncode != 0:  # a fresh machine has no package lists yet
        u = subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env, timeout=120)
        r = subprocess.run(install, capture_output=True, text=True, env=env, timeout=120)
        if r.returncode != 0:
            _unavailable(f"`{' '.join(install)}` failed (exit {r.returncode}): {(u.stderr + r.stderr)[-600:]}")
    missing = [b for b in DAEMONS + CLIENTS if shutil.which(b) is None]
    if missing:
        _unavailable(f"apt-get installed slurm but {missing} are still not on PATH")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """slurmctld + slurmd for this host, every file in ``self.dir``; clients get ``self.env``."""

    def __init__(self, path: str):
        self.dir = path
        self.host = socket.gethostname().split(".")[0]
        self.procs: list = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        self.env["SLURM_CONF"] = os.path.join(path, "slurm.conf")

    def write_config(self) -> None:
        d = self.dir
        for sub in ("state", "spool", "dev", "work"):
            os.makedirs(os.path.join(d, sub))
        for i in range(8):  # GRES needs a device file per GPU (file-less GRES drains the node)
            os.mknod(os.path.join(d, "dev", f"nvidia{i}"), 0o666 | 0o020000, os.makedev(1, 3))
        conf = f"""\
ClusterName=rcpatest
SlurmctldHost={self.host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
GresTypes=gpu
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
NodeName={self.host} CPUs=2 RealMemory=1000 Gres=gpu:8 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        with open(os.path.join(d, "slurm.conf"), "w") as f:
            f.write(conf)
        with open(os.path.join(d, "gres.conf"), "w") as f:
            f.write(f"AutoDetect=off\nName=gpu File={d}/dev/nvidia[0-7]\n")

    def start(self) -> None:
        for daemon in DAEMONS:
            log = open(os.path.join(self.dir, f"{daemon}.out"), "w")
            self.procs.append(subprocess.Popen([daemon, "-D"], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))
            if daemon == "slurmctld":
                self._until(lambda: self.run("scontrol", "ping", check=False).returncode == 0, 20, "slurmctld up")
        self._until(lambda: self.run("sinfo", "-h", "-o", "%T").stdout.strip() == "idle", 30, "the node idle")

    def run(self, *argv: str, check: bool = True, cwd: str = None, env: dict = None) -> subprocess.CompletedProcess:
        r = subprocess.run(list(argv), capture_output=True, text=True, env=env or self.env, cwd=cwd, timeout=30)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr}\n{self.logs()}")
        return r

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def logs(self) -> str:
        text = []
        for name in ("slurmctld.log", "slurmd.log"):
            p = os.path.join(self.dir, name)
            if os.path.exists(p):
                text.append(f"--- {name} (tail)\n" + "".join(open(p, errors="replace").readlines()[-25:]))
        return "\n".join(text)

    def _until(self, cond, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for p in self.procs:
                if p.poll() is not None:
                    raise AssertionError(f"{p.args[0]} exited ({p.returncode}) waiting for {what}\n{self.logs()}")
            if cond():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{self.logs()}")

    def stop(self) -> None:
        """Cancel every job (a job's slurmstepd ignores SIGTERM once the daemons are gone), wait for the queue
        and the node's step processes to empty, then stop the daemons we started, by PID."""
        if self.procs and self.procs[0].poll() is None:
            self.run("scancel", "--user", "root", check=False)
            try:
                self._until(lambda: self.run("squeue", "-h", check=False).stdout.strip() == "", 30, "squeue empty")
                self._until(lambda: self.run("scontrol", "listpids", check=False).stdout.count("\n") <= 1, 30,
                            "no job processes left")
            except AssertionError:
                pass  # the daemons are stopped below regardless
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


@pytest.fixture(scope="module")
def cluster():
    if not sys.platform.startswith("linux"):
        _unavailable("Slurm runs on Linux only")
    if os.geteuid() != 0:
        _unavailable("needs root: slurmd must run the job as root with auth/none, and the fake GPUs need mknod")
    _ensure_slurm_installed()
    path = tempfile.mkdtemp(prefix="rcpa-slurm-")  # short: slurmd puts unix sockets in its spool dir
    c = Cluster(path)
    try:
        try:
            c.write_config()
        except PermissionError as e:
            _unavailable(f"cannot mknod the fake GPU devices: {e}")
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(path, ignore_errors=True)


def _steps(metrics: str) -> list:
    if not os.path.exists(metrics):
        return []
    with open(metrics) as f:
        return [json.loads(line)["step"] for line in f if line.endswith("\n")]


def test_rcpa_7b_script_saves_on_usr1_requeues_and_resumes(cluster):
    out = os.path.join(cluster.dir, "run")
    work = os.path.join(cluster.dir, "work")  # the job's working dir: where its log goes (a dir, no subdir)
    env = dict(cluster.env)
    env.update(CONFIG="examples/configs/tiny_cpu.yaml", CHECKPOINT="", DATA="", OUTPUT_DIR=out, TP="1", PP="1",
               NPROC_PER_NODE="1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1", PYTHONPATH=ROOT,
               PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"],  # this env's torchrun
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
               TRITON_CACHE_ROOT=os.path.join(cluster.dir, "triton"))
    env.pop("REPO_DIR", None)
    overrides = ["model.tiny=true", "model.dtype=fp32", "parallel.distributed_optimizer=false",
                 f"run.steps={STEPS}", "run.save_interval=0", "run.progress_bar=false"]
    # Resources from the command line (the node has 2 CPUs); everything else is the script's own header.
    sub = cluster.run("sbatch", "--parsable", f"--chdir={work}", "--cpus-per-task=2", "examples/rcpa_7b.sh",
                      *overrides, cwd=ROOT, env=env)
    job_id = sub.stdout.strip().split(";")[0]
    log = os.path.join(work, f"rcpa-qwen2.5-vl-7b-{job_id}.out")
    metrics = os.path.join(out, "metrics.jsonl")

    def state() -> str:
        return cluster.job(job_id)["JobState"]

    def log_text() -> str:
        return open(log, errors="replace").read() if os.path.exists(log) else "(no log)"

    t0, phases = time.monotonic(), []

    def until(cond, timeout, what):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                phases.append(f"{what} at {time.monotonic() - t0:.1f} s")
                return
            time.sleep(0.2)
        raise AssertionError(f"job {job_id}: timed out waiting for {what} (state {state()}; {phases})\n"
                             f"{log_text()}\n{cluster.logs()}")

    # 1. It runs: steps appear in the output dir. Then the time-limit warning, as Slurm would send it.
    until(lambda: state() in ("FAILED", "COMPLETED") or len(_steps(metrics)) >= 1, 90, "the first step")
    assert state() == "RUNNING", f"job {job_id} ended before the signal: {state()}\n{log_text()}"
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)

    # 2. The trainer saves and exits, the script requeues: the job comes back and runs again. A requeued job
    # waits out the credential lifetime (BeginTime, cred_expire=5 s here): starting it earlier (`scontrol
    # update StartTime=now`) gets it killed as "non-startable: Job credential revoked", so it is only
    # released if it is really held.
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
    until(lambda: cluster.job(job_id).get("Restarts", "0") != "0" and state() in ("PENDING", "RUNNING") + ended,
          60, "the requeue")
    if cluster.job(job_id).get("Reason", "").startswith("JobHeld"):
        cluster.run("scontrol", "release", job_id)
    until(lambda: state() in ended, 120, "the rerun to end")
    info = cluster.job(job_id)
    text = log_text()
    print(f"job {job_id}: {phases}")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text}\n{cluster.logs()}"
    assert info["Restarts"] == "1", f"requeued {info['Restarts']} times: a finished run must not requeue\n{text}"

    # 3. The log kept both runs (--open-mode=append), and the rerun resumed from the step the first one saved.
    m = re.search(r"\[rcpa\] stop requested \(([^)]*)\): saved step (\d+), exiting", text)
    assert m, f"no save-and-exit line in the log\n{text}"
    saved = int(m.group(2))
    assert 1 <= saved < STEPS, text
    assert "USR1 (time limit near or preemption)" in text and f"requeueing job {job_id}" in text, text
    assert "(restart 0)" in text and "(restart 1)" in text, text
    assert re.search(rf"resumed from \S*step_0*{saved} at step {saved}\b", text), text
    assert f"step {STEPS}/{STEPS}" in text, text
    assert text.index(m.group(0)) < text.index("(restart 1)"), text

    # 4. metrics.jsonl: every step once, in order, across the two runs.
    assert _steps(metrics) == list(range(1, STEPS + 1)), _steps(metrics)
    assert not os.path.exists(os.path.join(out, "SAVE_AND_EXIT")), "the rerun must clear the stop file"
