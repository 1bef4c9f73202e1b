"""The whole reproduction in order: data -> base -> arms -> token KL -> analysis -> verdict, report, plots."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Dict, List, Optional, Sequence

from megatron_rcpa.repro.analysis import ArmResult, analyse_run
from megatron_rcpa.repro.arms import Preset, arms_for
from megatron_rcpa.repro.runner import arm_runs, load_domains, prepare_data, pretrain_base, run_arms
from megatron_rcpa.repro.tasks import BUILTIN_DOMAINS

__all__ = ["reproduce"]

COMMAND_FILE = "command_{}.txt"  # the command that ran the arms (a --report-only call names it too)
TIMING_FILE = "timing_{}.json"  # per set of domains: several reports can share one base in one working dir
KL_FILE = "token_kl.json"
DIAG_FILE = "diagnostics.json"


def _log(msg: str) -> None:
    print(msg, flush=True)


def reproduce(*, out: str, report_dir: str, preset: Preset, domain_specs: Sequence[str], seeds: Sequence[int],
              jobs: int, kl: bool = True, report_only: bool = False, command: str = "rcpa-repro",
              t0: float = None, interpretation: Optional[str] = None) -> Dict[str, dict]:
    from megatron_rcpa.repro.plots import write_plots
    from megatron_rcpa.repro.report import write_report
    from megatron_rcpa.repro.verdict import domain_verdict

    t0 = time.perf_counter() if t0 is None else t0
    os.makedirs(out, exist_ok=True)
    domains = load_domains(domain_specs)
    spec_of = {name: BUILTIN_DOMAINS.get(spec, spec) for name, spec in zip(domains, domain_specs)}
    timing_path = os.path.join(out, TIMING_FILE.format("+".join(domains)))
    timing = json.load(open(timing_path)) if os.path.isfile(timing_path) else {}
    paths = prepare_data(out, preset, domains)
    runs = arm_runs(out, preset, spec_of, seeds)
    if not report_only:
        base = pretrain_base(out, preset, paths, log=_log)
        if not base["reached"]:
            _log(f"[repro] WARNING: the base reached general accuracy {base['general_accuracy']:.3f} < "
                 f"{preset.pretrain_target} in {base['steps']} steps; the arms start from it anyway")
        t = time.perf_counter()
        run_arms(runs, preset, paths, base["policy"], jobs, log=_log)
        timing["arms_s"] = timing.get("arms_s", 0.0) + (time.perf_counter() - t)
    with open(os.path.join(out, "base", "base.json")) as f:
        base = json.load(f)
    diag_path = os.path.join(out, "base", DIAG_FILE)
    diag = json.load(open(diag_path)) if os.path.isfile(diag_path) else {}
    if not report_only and any(d not in diag for d in domains):
        from megatron_rcpa.repro.kl import base_diagnostics

        diag.update(base_diagnostics(base["policy"], {d: paths[d + "_val"] for d in domains if d not in diag}))
        with open(diag_path, "w") as f:
            json.dump(diag, f, indent=2)
    kl_path = os.path.join(out, KL_FILE)
    kl_res: Dict[str, Dict[str, Dict[str, float]]] = json.load(open(kl_path)) if os.path.isfile(kl_path) else {}
    if kl and not report_only:
        missing = [r for r in runs if r.run_dir not in kl_res]
        if missing:
            from megatron_rcpa.repro.kl import token_kl_for_runs

            t = time.perf_counter()
            new = token_kl_for_runs(base["policy"], [(r.run_dir, paths[r.domain + "_val"]) for r in missing])
            kl_res.update({k: {str(s): v for s, v in d.items()} for k, d in new.items()})
            with open(kl_path, "w") as f:
                json.dump(kl_res, f)
            timing["kl_s"] = timing.get("kl_s", 0.0) + (time.perf_counter() - t)
            _log(f"[repro] token KL to the base: {len(missing)} runs in {time.perf_counter() - t:.0f} s")
    command_path = os.path.join(out, COMMAND_FILE.format("+".join(domains)))
    if not report_only:
        with open(command_path, "w") as f:
            f.write(command)
    run_command = open(command_path).read().strip() if os.path.isfile(command_path) else None
    report_command = command if run_command and run_command != command else None
    command = run_command or command
    timing["base_s"] = base["wall_s"]  # the pretraining runs' own wall time (base.json), shared by every report
    timing["total_s"] = sum(timing.get(k, 0.0) for k in ("base_s", "arms_s", "kl_s"))
    with open(timing_path, "w") as f:
        json.dump(timing, f, indent=2)

    results: Dict[str, Dict[str, List[ArmResult]]] = {}
    for r in runs:
        steps_kl = {int(s): v for s, v in kl_res.get(r.run_dir, {}).items()}
        res = analyse_run(r.run_dir, domains[r.domain], r.arm.name, r.seed, kl=steps_kl)
        results.setdefault(r.domain, {}).setdefault(r.arm.name, []).append(res)
    # the base's general accuracy on the held-out set, as every arm measured it at step 0 (identical weights)
    step0 = [a.evals[0].general_acc for arms in results.values() for runs_ in arms.values() for a in runs_
             if a.evals[0].step == 0]
    base_general = sum(step0) / len(step0) if step0 else base["general_accuracy"]
    base = dict(base, general_accuracy=base_general, pretrain_val_accuracy=base["general_accuracy"],
                domain_diagnostics={d: diag[d] for d in domains if d in diag})
    verdicts = {d: domain_verdict(arms, base_general) for d, arms in results.items()}
    labels = {a.name: a.label for a in arms_for(preset)}
    preset_info = dict(dataclasses.asdict(preset), arm_names=[a.name for a in arms_for(preset)], seeds=list(seeds))
    notes = _notes(results, timing, preset)
    write_plots(report_dir, results, base_general, verdicts, labels)
    write_report(report_dir, preset=preset_info, base=base, results=results, verdicts=verdicts, labels=labels,
                 total_wall_s=timing["total_s"], command=command, notes=notes, interpretation=interpretation,
                 report_command=report_command)
    return verdicts


def _notes(results, timing: dict, preset: Preset) -> List[str]:
    out = [f"Wall time: base {timing.get('base_s', 0):.0f} s, arms {timing.get('arms_s', 0):.0f} s "
           f"({preset.jobs} at a time, one thread each), token KL {timing.get('kl_s', 0):.0f} s; total "
           f"{timing.get('total_s', 0):.0f} s."]
    for d, arms in results.items():
        for a, runs in arms.items():
            for r in runs:
                if len(r.evals) < 2:
                    out.append(f"{d}/{a}/seed{r.seed}: only {len(r.evals)} evaluation(s) recorded.")
    return out
