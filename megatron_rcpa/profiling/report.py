"""Throughput report: per-phase records, a printed table, JSON (schema below) and a PNG bar chart.

JSON schema (``schema_version`` 1; :data:`REPORT_SCHEMA` is the machine-readable JSON Schema, checked by
:func:`validate_report`)::

    {
      "schema_version": 1,
      "tool": "profile_throughput",
      "created_utc": "2026-11-26T12:00:00Z",
      "device": {"kind": "cuda" | "cpu", "name": str, "capability": [major, minor] | null,
                 "world_size": int},                      # GPUs (processes) the run used
      "config": {...},                                    # summary of the run configuration (free-form)
      "flop_model": {"attention": "full" | "causal", "train_multiplier": 3, "doc": str},
      "runs": [                                           # one per precision (two with --compare)
        {"label": "bf16" | "fp8-<recipe>" (te) | "fp8-torchao-<recipe>", "precision": "bf16" | "fp8",
         "fp8_recipe": str | null, "fp8_backend": "te" | "torchao" | null, "fp8_format": str | null (te only),
         "peak_tflops_per_gpu": float | null,              # dense peak used for MFU (null: no MFU)
         "peak_source": str | null,
         "steps": int, "warmup_steps": int,
         "phases": [PHASE, ...],                          # rollout, logprob, train, optimizer
         "total": PHASE}                                  # phase = "total": the whole step
      ],
      "comparison": [{"phase": str, "baseline": label, "other": label, "speedup": float | null}]
    }

    PHASE = {"phase": str,
             "time_s": float,                # median over the measured steps
             "times_s": [float],             # every measured step
             "tokens": int | null,           # tokens the phase processed, all GPUs, per step (see below)
             "padded_tokens": int | null,    # the same with padding (what the kernels were fed)
             "tokens_per_s_per_gpu": float | null,
             "flops": int | null,            # model FLOPs per step, all GPUs (megatron_rcpa.profiling.flops)
             "tflops_per_gpu": float | null,
             "mfu": float | null,            # tflops_per_gpu / peak_tflops_per_gpu
             "peak_memory_bytes": int | null}  # max over the phase and steps, this rank (null on CPU)

What ``tokens`` counts: rollout = generated tokens; logprob and train = the packed sequences' tokens
(prompt + forced prefix + generated, each token once however many passes); optimizer = null; total = the
packed sequences' tokens (the usual "tokens/s/GPU" of RL trainers). Throughputs divide by the phase's
median time and by the world size.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import statistics
from typing import Any, Dict, List, Optional, Sequence

__all__ = [
    "REPORT_SCHEMA",
    "SCHEMA_VERSION",
    "build_report",
    "build_run",
    "format_table",
    "phase_record",
    "plot_report",
    "validate_report",
    "write_json",
]

SCHEMA_VERSION = 1

_NUM = {"type": ["number", "null"]}
_INT = {"type": ["integer", "null"]}
_PHASE_SCHEMA = {
    "type": "object",
    "required": ["phase", "time_s", "times_s", "tokens", "padded_tokens", "tokens_per_s_per_gpu", "flops",
                 "tflops_per_gpu", "mfu", "peak_memory_bytes"],
    "properties": {
        "phase": {"type": "string"},
        "time_s": {"type": "number", "minimum": 0},
        "times_s": {"type": "array", "items": {"type": "number", "minimum": 0}},
        "tokens": _INT, "padded_tokens": _INT, "tokens_per_s_per_gpu": _NUM, "flops": _INT,
        "tflops_per_gpu": _NUM, "mfu": _NUM, "peak_memory_bytes": _INT,
    },
}
REPORT_SCHEMA: Dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "megatron_rcpa throughput profile",
    "type": "object",
    "required": ["schema_version", "tool", "created_utc", "device", "config", "flop_model", "runs", "comparison"],
    "properties": {
        "schema_version": {"type": "integer", "enum": [SCHEMA_VERSION]},
        "tool": {"type": "string"},
        "created_utc": {"type": "string"},
        "device": {"type": "object", "required": ["kind", "name", "capability", "world_size"],
                   "properties": {"kind": {"type": "string", "enum": ["cuda", "cpu"]}, "name": {"type": "string"},
                                  "capability": {"type": ["array", "null"], "items": {"type": "integer"}},
                                  "world_size": {"type": "integer", "minimum": 1}}},
        "config": {"type": "object"},
        "flop_model": {"type": "object", "required": ["attention", "train_multiplier", "doc"],
                       "properties": {"attention": {"type": "string", "enum": ["full", "causal"]},
                                      "train_multiplier": {"type": "integer"}, "doc": {"type": "string"}}},
        "runs": {"type": "array", "items": {
            "type": "object",
            "required": ["label", "precision", "fp8_recipe", "peak_tflops_per_gpu", "peak_source", "steps",
                         "warmup_steps", "phases", "total"],
            "properties": {
                "label": {"type": "string"},
                "precision": {"type": "string", "enum": ["bf16", "fp8"]},
                "fp8_recipe": {"type": ["string", "null"]},
                "fp8_backend": {"type": ["string", "null"], "enum": ["te", "torchao", None]},
                "fp8_format": {"type": ["string", "null"]},
                "peak_tflops_per_gpu": _NUM, "peak_source": {"type": ["string", "null"]},
                "steps": {"type": "integer", "minimum": 1}, "warmup_steps": {"type": "integer", "minimum": 0},
                "phases": {"type": "array", "items": _PHASE_SCHEMA},
                "total": _PHASE_SCHEMA,
            }}},
        "comparison": {"type": "array", "items": {
            "type": "object", "required": ["phase", "baseline", "other", "speedup"],
            "properties": {"phase": {"type": "string"}, "baseline": {"type": "string"}, "other": {"type": "string"},
                           "speedup": _NUM}}},
    },
}

_JSON_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "null": lambda v: v is None,
}


def _check(value: Any, schema: Dict[str, Any], path: str) -> None:
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_JSON_TYPES[t](value) for t in types):
            raise ValueError(f"profile report: {path} = {value!r} is not of type {' | '.join(types)}")
    if "enum" in schema and value not in schema["enum"]:
        raise ValueError(f"profile report: {path} = {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and isinstance(value, (int, float)) and value < schema["minimum"]:
        raise ValueError(f"profile report: {path} = {value!r} is below the minimum {schema['minimum']}")
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                raise ValueError(f"profile report: {path} has no key {key!r}")
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                _check(value[key], sub, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], f"{path}[{i}]")


def validate_report(report: Dict[str, Any]) -> None:
    """Raise ValueError naming the first key of ``report`` that does not follow :data:`REPORT_SCHEMA`."""
    _check(report, REPORT_SCHEMA, "report")


# ------------------------------------------------------------------------------------------- records
def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b <= 0:
        return None
    return float(a) / float(b)


def phase_record(phase: str, times_s: Sequence[float], *, tokens: Optional[int], flops: Optional[int],
                 world_size: int, peak_tflops: Optional[float], peak_memory_bytes: Optional[int] = None,
                 padded_tokens: Optional[int] = None) -> Dict[str, Any]:
    """One phase's record: ``times_s`` per measured step; ``tokens``/``flops`` per step summed over all GPUs."""
    if not times_s:
        raise ValueError(f"phase {phase!r}: no measured steps")
    time_s = float(statistics.median(times_s))
    per_gpu_time = time_s * world_size
    tflops = _ratio(flops, per_gpu_time)
    tflops = tflops / 1e12 if tflops is not None else None
    return {
        "phase": phase,
        "time_s": time_s,
        "times_s": [float(t) for t in times_s],
        "tokens": None if tokens is None else int(tokens),
        "padded_tokens": None if padded_tokens is None else int(padded_tokens),
        "tokens_per_s_per_gpu": _ratio(tokens, per_gpu_time),
        "flops": None if flops is None else int(flops),
        "tflops_per_gpu": tflops,
        "mfu": _ratio(tflops, peak_tflops),
        "peak_memory_bytes": None if peak_memory_bytes is None else int(peak_memory_bytes),
    }


def build_run(*, label: str, precision: str, fp8_recipe: Optional[str], phases: List[Dict[str, Any]],
              step_tokens: Optional[int], step_padded_tokens: Optional[int] = None, world_size: int,
              peak_tflops: Optional[float], peak_source: Optional[str], warmup_steps: int,
              fp8_backend: Optional[str] = None, fp8_format: Optional[str] = None) -> Dict[str, Any]:
    """A run (one precision): its phase records plus the ``total`` record of the whole step (per-step sum of
    the phases' times, median over steps; FLOPs summed; peak memory the max over phases)."""
    if not phases:
        raise ValueError("build_run: no phases")
    steps = len(phases[0]["times_s"])
    if any(len(p["times_s"]) != steps for p in phases):
        raise ValueError("build_run: the phases were measured over different numbers of steps")
    step_times = [sum(p["times_s"][i] for p in phases) for i in range(steps)]
    flops = [p["flops"] for p in phases if p["flops"] is not None]
    mems = [p["peak_memory_bytes"] for p in phases if p["peak_memory_bytes"] is not None]
    total = phase_record("total", step_times, tokens=step_tokens, flops=sum(flops) if flops else None,
                         world_size=world_size, peak_tflops=peak_tflops, peak_memory_bytes=max(mems) if mems else None,
                         padded_tokens=step_padded_tokens)
    return {"label": label, "precision": precision, "fp8_recipe": fp8_recipe, "fp8_backend": fp8_backend,
            "fp8_format": fp8_format, "peak_tflops_per_gpu": peak_tflops,
            "peak_source": peak_source, "steps": steps, "warmup_steps": int(warmup_steps), "phases": phases,
            "total": total}


def _comparison(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    if len(runs) < 2:
        return []
    base = runs[0]
    out = []
    for other in runs[1:]:
        times = {p["phase"]: p["time_s"] for p in other["phases"] + [other["total"]]}
        for p in base["phases"] + [base["total"]]:
            t = times.get(p["phase"])
            out.append({"phase": p["phase"], "baseline": base["label"], "other": other["label"],
                        "speedup": _ratio(p["time_s"], t)})
    return out


def build_report(*, device: Dict[str, Any], config: Dict[str, Any], runs: List[Dict[str, Any]],
                 attention: str = "full", flop_doc: str = "megatron_rcpa/profiling/flops.py") -> Dict[str, Any]:
    report = {
        "schema_version": SCHEMA_VERSION,
        "tool": "profile_throughput",
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": dict(device),
        "config": dict(config),
        "flop_model": {"attention": attention, "train_multiplier": 3, "doc": flop_doc},
        "runs": runs,
        "comparison": _comparison(runs),
    }
    validate_report(report)
    return report


# --------------------------------------------------------------------------------------------- output
def _fmt(value: Optional[float], spec: str, scale: float = 1.0, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{(value * scale if scale != 1.0 else value):{spec}}{suffix}"


_COLUMNS = ("phase", "time ms", "tokens", "tok/s/GPU", "TFLOP/s/GPU", "MFU", "peak mem GiB")


def _row(rec: Dict[str, Any]) -> List[str]:
    return [rec["phase"], _fmt(rec["time_s"], ".1f", 1e3), _fmt(rec["tokens"], "d"),
            _fmt(rec["tokens_per_s_per_gpu"], ",.1f"), _fmt(rec["tflops_per_gpu"], ".4g"),
            _fmt(rec["mfu"], ".1%"), _fmt(rec["peak_memory_bytes"], ".2f", 1 / 2**30)]


def _grid(header: Sequence[str], rows: List[List[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_table(report: Dict[str, Any]) -> str:
    """The report as text: one table per run, then a side-by-side comparison when there are several."""
    dev = report["device"]
    parts = [f"device: {dev['name']} ({dev['kind']}), world size {dev['world_size']}; "
             f"FLOP model: attention={report['flop_model']['attention']}, train = 3 x forward"]
    for run in report["runs"]:
        peak = (f"peak {run['peak_tflops_per_gpu']:g} TFLOP/s/GPU ({run['peak_source']})"
                if run["peak_tflops_per_gpu"] is not None else "no peak for MFU")
        parts.append(f"\n[{run['label']}] {run['steps']} measured steps after {run['warmup_steps']} warm-up; {peak}")
        parts.append(_grid(_COLUMNS, [_row(r) for r in run["phases"] + [run["total"]]]))
    if len(report["runs"]) > 1:
        runs = report["runs"]
        header = ["phase"] + [f"{r['label']} ms" for r in runs] + [f"{r['label']} TFLOP/s" for r in runs]
        header += [f"{r['label']} MFU" for r in runs] + [f"speed-up {r['label']}" for r in runs[1:]]
        speed = {(c["other"], c["phase"]): c["speedup"] for c in report["comparison"]}
        rows = []
        for i, base in enumerate(runs[0]["phases"] + [runs[0]["total"]]):
            recs = [(r["phases"] + [r["total"]])[i] for r in runs]
            rows.append([base["phase"]] + [_fmt(r["time_s"], ".1f", 1e3) for r in recs]
                        + [_fmt(r["tflops_per_gpu"], ".4g") for r in recs] + [_fmt(r["mfu"], ".1%") for r in recs]
                        + [_fmt(speed.get((r["label"], base["phase"])), ".2f", suffix="x") for r in runs[1:]])
        parts.append("\nside by side")
        parts.append(_grid(header, rows))
    return "\n".join(parts)


def write_json(report: Dict[str, Any], path: str) -> str:
    validate_report(report)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    return path


def plot_report(report: Dict[str, Any], path: str) -> str:
    """PNG with two bar charts per phase (grouped by run): median time (ms) and TFLOP/s per GPU."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = report["runs"]
    phases = [p["phase"] for p in runs[0]["phases"]]
    fig = Figure(figsize=(4 + 1.6 * len(phases) * len(runs) ** 0.5, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    width = 0.8 / len(runs)
    for k, run in enumerate(runs):
        recs = {p["phase"]: p for p in run["phases"]}
        xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(phases))]
        times = [recs[p]["time_s"] * 1e3 if p in recs else 0.0 for p in phases]
        tflops = [(recs[p]["tflops_per_gpu"] or 0.0) if p in recs else 0.0 for p in phases]
        axes[0].bar(xs, times, width, label=run["label"])
        axes[1].bar(xs, tflops, width, label=run["label"])
    for ax, title in zip(axes, ("median time per step (ms)", "TFLOP/s per GPU")):
        ax.set_xticks(range(len(phases)))
        ax.set_xticklabels(phases)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{report['device']['name']} x {report['device']['world_size']}: "
                 f"{report['config'].get('model', '')}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
