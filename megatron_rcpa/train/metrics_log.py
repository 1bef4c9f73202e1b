"""Where a run's metrics go: ``<output_dir>/metrics.jsonl`` (one JSON object per step, what ``rcpa-plot``
reads), one compact line per step on stdout, a tqdm progress bar with ETA, TensorBoard events
(``<output_dir>/tensorboard``) and, when enabled, Weights & Biases (offline unless WANDB_MODE says
otherwise). Only one rank logs (a last pipeline stage rank, which holds the loss metrics)."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Dict, Optional

COMPACT = [("reward", "rew", ".3f"), ("reward_probe", "probe", ".3f"), ("familiarity", "fam", ".3f"),
           ("rho", "rho", ".3f"), ("mean_k_over_l", "k/L", ".2f"), ("zero_var_frac", "zv", ".2f"),
           ("loss", "loss", ".4f"), ("imit_nll", "imit", ".3f"), ("entropy", "ent", ".3f"),
           ("clip_frac_high", "clip+", ".3f"), ("grad_norm", "gn", ".3f"), ("time_step", "s", ".1f")]


# TensorBoard / wandb names: the flat RCPA_SPEC section 5 keys of metrics.jsonl, grouped under the prefixes users
# of verl / NeMo-RL dashboards expect. First match wins; "val/..." and already-namespaced keys stay as they are.
NAMESPACES = (
    ("reward/", ("reward",)),
    ("curriculum/", ("familiarity", "rho", "mean_k_over_l", "phase", "lambda_t", "zero_var_frac", "num_probes",
                     "probe", "difficulty")),
    ("loss/", ("loss", "imit_nll", "entropy", "kl_ref", "clip_frac", "approx_kl", "pg_", "policy_")),
    ("optim/", ("grad_norm", "lr", "update_ok", "skipped_updates")),
    ("timing/", ("time_", "tokens_per_s")),
    ("memory/", ("memory_", "mem_")),
    ("rollout/", ("response_length", "logp_mismatch", "padding_frac", "gen_tokens", "seq_tokens")),
)


def namespaced(key: str) -> str:
    """The dashboard name of a metrics.jsonl key, e.g. ``rho`` -> ``curriculum/rho``, ``time_rollout`` ->
    ``timing/time_rollout``; unknown keys go under ``misc/``."""
    if "/" in key:
        return key
    for prefix, starts in NAMESPACES:
        if any(key == s or key.startswith(s) for s in starts):
            return prefix + key
    return "misc/" + key


def compact_line(step: int, total: int, m: Dict[str, float]) -> str:
    parts = [f"step {step}/{total}", f"[{m.get('phase_name', '?')}]"]
    for key, short, fmt in COMPACT:
        v = m.get(key)
        if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
            parts.append(f"{short}={v:{fmt}}")
    return " ".join(parts)


class MetricsLogger:
    def __init__(self, cfg, enabled: bool = True) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.total = cfg.run.steps
        self._bar = None
        self._tb = None
        self._wandb = None
        self._jsonl = None
        if not enabled:
            return
        out = cfg.run.output_dir
        os.makedirs(out, exist_ok=True)
        self._path = os.path.join(out, "metrics.jsonl")
        with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg.to_dict(), f, indent=2)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (a dependency)

            self._tb = SummaryWriter(os.path.join(out, "tensorboard"))
        if cfg.logging.wandb:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("logging.wandb=true needs the wandb package: pip install wandb") from e
            os.environ.setdefault("WANDB_MODE", "offline")
            # one wandb run per output dir: a requeued / resumed job continues it instead of starting another
            self._wandb = wandb.init(project=cfg.logging.wandb_project, name=cfg.run.name, dir=out,
                                     config=cfg.to_dict(), id=wandb_run_id(out, cfg.run.name), resume="allow")

    def info(self, text: str) -> None:
        if self.enabled:
            self._write(text)

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def start(self, step: int) -> None:
        """Open metrics.jsonl for appending after ``step`` (the step the run starts or resumes from): rows of
        later steps (written before a kill, after the checkpoint being resumed) and a torn last line are
        dropped first, so every step appears once."""
        if not self.enabled:
            return
        dropped = truncate_metrics(self._path, step)
        if dropped:
            self._write(f"metrics.jsonl: dropped {dropped} row(s) after step {step} (not in the checkpoint "
                        "resumed from) or torn by a kill")
        self._jsonl = open(self._path, "a", encoding="utf-8")
        if self.cfg.run.progress_bar and sys.stderr.isatty():  # no bar in a log file: the step lines stay
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=step, desc=self.cfg.run.name, unit="step",
                             file=sys.stderr, dynamic_ncols=True)

    def record(self, step: int, metrics: Dict[str, float]) -> None:
        """Metrics outside a training step (e.g. validation at step 0): to metrics.jsonl, TensorBoard and wandb,
        without a console step line."""
        if not self.enabled or not metrics:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        self._dashboards(step, metrics)

    def _dashboards(self, step: int, metrics: Dict[str, float]) -> Dict[str, float]:
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        named = {namespaced(k): v for k, v in numeric.items()}
        if self._tb is not None:
            for k, v in named.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(named, step=step)
        return numeric

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._jsonl is None:
            raise RuntimeError("MetricsLogger.log before start(): start(step) opens metrics.jsonl")
        record = {"step": step, **{k: v for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if step % self.cfg.run.log_interval == 0 or step == self.total:
            self._write(compact_line(step, self.total, metrics))
        numeric = self._dashboards(step, metrics)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(reward=f"{numeric.get('reward', float('nan')):.3f}",
                                  rho=f"{numeric.get('rho', float('nan')):.2f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()


def wandb_run_id(output_dir: str, name: str) -> str:
    """A stable wandb run id for ``output_dir``, kept in ``<output_dir>/wandb_id`` (made on the first start)."""
    import hashlib
    import re

    path = os.path.join(output_dir, "wandb_id")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            run_id = f.read().strip()
        if run_id:
            return run_id
    digest = hashlib.sha1(os.path.abspath(output_dir).encode()).hexdigest()[:8]
    run_id = f"{re.sub(r'[^A-Za-z0-9_-]+', '-', name)[:48]}-{digest}"
    with open(path, "w", encoding="utf-8") as f:
        f.write(run_id + "\n")
    return run_id


def _parse_lines(path: str):
    """``(line_number, record or None, raw)`` per non-empty line; None for a line that is not a JSON object."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            raw = line.strip()
            if not raw:
                continue
            try:
                rec = json.loads(raw)
            except ValueError:
                rec = None
            yield n, (rec if isinstance(rec, dict) and "step" in rec else None), line


def truncate_metrics(path: str, step: int) -> int:
    """Keep the rows of ``path`` with ``step <= step`` (and drop a torn last line); returns how many rows went.
    The file is rewritten atomically (a temp file renamed over it)."""
    if not os.path.isfile(path):
        return 0
    rows = list(_parse_lines(path))
    keep, dropped = [], 0
    for i, (n, rec, line) in enumerate(rows):
        if rec is None:
            if i != len(rows) - 1:
                raise ValueError(f"{path}:{n}: not a JSON metrics row (only a torn last line is dropped)")
            dropped += 1
        elif rec["step"] <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
        else:
            dropped += 1
    if dropped:
        from megatron_rcpa.train.checkpointing import write_file_durably

        write_file_durably(path, "".join(keep))
    return dropped


def read_metrics(run_dir: str, path: Optional[str] = None):
    """The records of ``<run_dir>/metrics.jsonl``; a resumed run's repeated steps keep the last record. A torn
    last line (a run killed while writing it) is skipped with a warning on stderr; a bad line elsewhere is an
    error naming it."""
    path = path or os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} not found: is {run_dir!r} an rcpa-train output_dir?")
    by_step = {}
    rows = list(_parse_lines(path))
    for i, (n, rec, line) in enumerate(rows):
        if rec is None:
            if i == len(rows) - 1:
                print(f"warning: {path}:{n}: skipped a torn last line ({line.strip()[:60]!r}...): the run was "
                      "killed while writing it", file=sys.stderr)
                continue
            raise ValueError(f"{path}:{n}: not a JSON metrics row: {line.strip()[:80]!r}")
        by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]
