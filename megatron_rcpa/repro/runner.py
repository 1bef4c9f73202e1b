"""Runs the reproduction through ``rcpa-train``: data files, the base model, every arm, then the analysis.

Layout of ``<out>`` (the working directory; checkpoints live here, not in the report)::

    data/general_train.jsonl, data/general_val.jsonl, data/<domain>_train.jsonl, data/<domain>_val.jsonl
    base/                          the pretraining run (run.mode=sft on the general mix); its checkpoint's
                                   policy/ is every arm's model.checkpoint
    runs/<domain>/<arm>/seed<k>/   one rcpa-train output_dir per arm (metrics.jsonl, generations/, checkpoints/)
    runs/.../wall.json             the arm's wall time (seconds, measured around the process)

Each rcpa-train run is its own process (``python -m megatron_rcpa.train``), ``preset.jobs`` at a time, each
with one thread. A finished run (its ``wall.json`` present) is not run again, so an interrupted reproduction
picks up where it stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from megatron_rcpa.repro.arms import Arm, Preset, arms_for
from megatron_rcpa.repro.tasks import DOMAIN_SOURCE, Domain, general_sources, load_domain, make_split

__all__ = ["ArmRun", "prepare_data", "pretrain_base", "arm_runs", "run_arms", "base_policy_dir", "trainer_command"]

REWARD = "megatron_rcpa.repro.rewards:repro_reward"
WALL_FILE = "wall.json"
DATA_SEED = 7


def _write_jsonl(path: str, rows: Sequence[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)


def prepare_data(out: str, preset: Preset, domains: Dict[str, Domain]) -> Dict[str, str]:
    """The JSONL files of the run (deterministic: fixed seeds); returns their paths by name. A domain's
    validation file holds its held-out domain prompts followed by the general held-out set, so one validation
    measures domain accuracy and every general task (``val/<source>/accuracy``)."""
    d = os.path.join(out, "data")
    paths = {"general_train": os.path.join(d, "general_train.jsonl"),
             "general_val": os.path.join(d, "general_val.jsonl")}
    gval = make_split(general_sources(), preset.val_per_source, seed=DATA_SEED)
    gtrain = make_split(general_sources(), preset.train_per_source, seed=DATA_SEED + 1,
                        exclude=[r["prompt"] for r in gval])
    _write_jsonl(paths["general_val"], gval)
    _write_jsonl(paths["general_train"], gtrain)
    for name, dom in domains.items():
        dval = make_split([(DOMAIN_SOURCE, dom.sample)], preset.val_per_source, seed=DATA_SEED + 2)
        dtrain = make_split([(DOMAIN_SOURCE, dom.sample)], preset.train_per_source, seed=DATA_SEED + 3,
                            exclude=[r["prompt"] for r in dval])
        paths[f"{name}_train"] = os.path.join(d, f"{name}_train.jsonl")
        paths[f"{name}_val"] = os.path.join(d, f"{name}_val.jsonl")
        _write_jsonl(paths[f"{name}_train"], dtrain)
        _write_jsonl(paths[f"{name}_val"], dval + gval)
    return paths


def _common(preset: Preset, reward_domain: str) -> List[str]:
    return ["model.family=llama", "run.progress_bar=false", "logging.tensorboard=false", "run.val_generations=1000000",
            f"rollout.max_new_tokens={preset.max_new_tokens}", f"reward.name={REWARD}",
            f"reward.kwargs.domain={reward_domain}", "run.resume=auto", *preset.device_overrides]


def trainer_command(overrides: Sequence[str]) -> List[str]:
    return [sys.executable, "-m", "megatron_rcpa.train", *overrides]


def _run(cmd: List[str], log_path: str) -> float:
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = open(log_path, encoding="utf-8", errors="replace").read()[-3000:]
        raise RuntimeError(f"rcpa-train failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return wall


def _last_val(run_dir: str) -> Optional[dict]:
    from megatron_rcpa.train.metrics_log import read_metrics

    recs = [r for r in read_metrics(run_dir) if "val/accuracy" in r]
    return recs[-1] if recs else None


def base_policy_dir(out: str) -> str:
    base = os.path.join(out, "base")
    with open(os.path.join(base, "latest")) as f:
        return os.path.join(base, "checkpoints", f.read().strip(), "policy")


def pretrain_base(out: str, preset: Preset, paths: Dict[str, str], log=print) -> dict:
    """Pretrain the base model (``run.mode=sft`` on the general mix): ``preset.pretrain_steps`` steps with a
    cosine decay from ``pretrain_lr`` to a tenth of it, then, while its greedy general accuracy is below
    ``preset.pretrain_target``, chunks of ``preset.pretrain_chunk`` steps at that tenth (up to
    ``pretrain_max_steps``).
    Returns ``{"steps", "general_accuracy", "per_task", "reached", "wall_s", "policy"}``."""
    run_dir = os.path.join(out, "base")
    info_path = os.path.join(run_dir, "base.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            return json.load(f)
    steps, wall = 0, 0.0
    last = None
    low = preset.pretrain_lr / 10
    while steps < preset.pretrain_max_steps:
        first = steps == 0
        steps = min(steps + (preset.pretrain_steps if first else preset.pretrain_chunk), preset.pretrain_max_steps)
        lr = ([f"optim.lr={preset.pretrain_lr!r}", "optim.lr_schedule=cosine", f"optim.min_lr={low!r}"] if first
              else [f"optim.lr={low!r}", "optim.lr_schedule=constant"])
        overrides = _common(preset, "d1") + [
            "model.tiny=true", f"model.tiny_hidden_size={preset.hidden_size}",
            f"model.tiny_num_layers={preset.num_layers}", "run.mode=sft", "run.seed=1234",
            f"run.output_dir={run_dir}", f"data.path={paths['general_train']}",
            f"data.val_path={paths['general_val']}", f"run.steps={steps}", f"run.val_interval={preset.pretrain_chunk}",
            f"run.save_interval={preset.pretrain_chunk}", f"data.prompts_per_step={preset.pretrain_prompts}",
            f"optim.micro_batch_size={preset.pretrain_prompts}", *lr, "rcpa.group_size=1", "run.log_interval=50"]
        wall += _run(trainer_command(overrides), os.path.join(run_dir, "train.log"))
        last = _last_val(run_dir)
        acc = last["val/accuracy"] if last else float("nan")
        log(f"[repro] base: step {steps}, general accuracy {acc:.3f} ({wall:.0f} s)")
        if last and acc >= preset.pretrain_target:
            break
    per_task = {k.split("/")[1]: v for k, v in (last or {}).items() if k.count("/") == 2 and k.endswith("/accuracy")}
    info = {"steps": steps, "general_accuracy": last["val/accuracy"] if last else None, "per_task": per_task,
            "reached": bool(last and last["val/accuracy"] >= preset.pretrain_target), "wall_s": wall,
            "policy": base_policy_dir(out), "target": preset.pretrain_target}
    with open(info_path, "w") as f:
        json.dump(info, f, indent=2)
    return info


@dataclass(frozen=True)
class ArmRun:
    domain: str  # the name of the domain (its spec for the reward is ``domain_spec``)
    domain_spec: str
    arm: Arm
    seed: int
    run_dir: str


def arm_runs(out: str, preset: Preset, domain_specs: Dict[str, str], seeds: Sequence[int]) -> List[ArmRun]:
    return [ArmRun(name, spec, arm, seed, os.path.join(out, "runs", name, arm.name, f"seed{seed}"))
            for name, spec in domain_specs.items() for seed in seeds for arm in arms_for(preset)]


def _arm_overrides(r: ArmRun, preset: Preset, paths: Dict[str, str], base_policy: str) -> List[str]:
    p = preset
    return _common(p, r.domain_spec) + [
        f"model.checkpoint={base_policy}", f"run.output_dir={r.run_dir}", f"run.seed={1000 + r.seed}",
        f"rcpa.curriculum.seed={r.seed}", f"data.path={paths[r.domain + '_train']}",
        f"data.val_path={paths[r.domain + '_val']}", f"run.steps={p.steps}", f"run.val_interval={p.val_interval}",
        "run.val_before_train=true", f"run.save_interval={p.kl_interval}",
        f"data.prompts_per_step={p.prompts_per_step}",
        f"rcpa.group_size={p.group_size}", f"optim.micro_batch_size={p.prompts_per_step * p.group_size}",
        f"optim.lr={p.lr!r}", "run.log_interval=10", *r.arm.overrides]


def run_arms(runs: Sequence[ArmRun], preset: Preset, paths: Dict[str, str], base_policy: str, jobs: int,
             log=print) -> None:
    """Every arm run not finished yet, ``jobs`` at a time; each one's wall time goes to its ``wall.json``."""
    todo = [r for r in runs if not os.path.isfile(os.path.join(r.run_dir, WALL_FILE))]

    def one(r: ArmRun) -> None:
        cmd = trainer_command(_arm_overrides(r, preset, paths, base_policy))
        wall = _run(cmd, os.path.join(r.run_dir, "train.log"))
        with open(os.path.join(r.run_dir, WALL_FILE), "w") as f:
            json.dump({"wall_s": wall}, f)
        log(f"[repro] {r.domain}/{r.arm.name}/seed{r.seed}: done in {wall:.0f} s")

    if jobs <= 1:
        for r in todo:
            one(r)
        return
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for fut in [pool.submit(one, r) for r in todo]:
            fut.result()


def load_domains(specs: Sequence[str]) -> Dict[str, Domain]:
    """Domain name -> Domain for the ``--domains`` specs (names must be distinct)."""
    out: Dict[str, Domain] = {}
    for spec in specs:
        dom = load_domain(spec)
        if dom.name in out:
            raise ValueError(f"two domains are named {dom.name!r}; give each --domain a distinct name")
        out[dom.name] = dom
    return out
