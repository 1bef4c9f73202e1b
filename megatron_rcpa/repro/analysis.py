"""From the runs' files to the numbers of the reproduction: per-eval curves, R(tau), leak, sign-off rate,
token counts, wall time.

Sources, all written by ``rcpa-train`` itself:

- ``metrics.jsonl``: per step ``zero_var_frac``, ``reward``, ``reward_probe``, ``familiarity``, ``rho``,
  ``mean_k_over_l``, ``gen_tokens``, ``seq_tokens``, ``time_step``; per validation ``val/<source>/accuracy``
  (``domain`` and each general task);
- ``generations/step_<N>.jsonl``: every held-out answer at step N (``run.val_generations`` is set above the
  set's size): per-sample success for the bootstrap, the leak (a general answer holding a character new to the
  base) and the sign-off rate (a domain answer ending with the domain's sign-off).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from megatron_rcpa.repro.tasks import DOMAIN_SOURCE, GENERAL_TASKS, Domain
from megatron_rcpa.train.metrics_log import read_metrics
from megatron_rcpa.train.validation import GENERATIONS_DIR

__all__ = ["TAU", "EvalPoint", "ArmResult", "analyse_run", "first_reach"]

TAU = 0.9


@dataclass
class EvalPoint:
    step: int
    domain_acc: float
    general_acc: float  # mean over the general tasks
    per_task: Dict[str, float]
    leak: float  # fraction of general answers holding a character new to the base
    sign_off_rate: Optional[float]  # fraction of domain answers ending with the sign-off (domains that have one)
    general_success: List[float]  # per held-out general sample, in file order (for the bootstrap)
    domain_success: List[float]
    no_stop_general: float = 0.0  # fraction of general answers that ran to max_new_tokens without EOS
    no_stop_domain: float = 0.0
    kl_domain: Optional[float] = None  # token KL(policy || base) on the held-out references (runner's forward)
    kl_general: Optional[float] = None


@dataclass
class ArmResult:
    domain: str
    arm: str
    seed: int
    evals: List[EvalPoint]
    steps: List[int]  # training steps with a metrics record
    train: Dict[str, List[float]]  # per-step series (nan where absent)
    wall_s: Optional[float]
    gen_tokens: float
    seq_tokens: float
    extra: Dict[str, float] = field(default_factory=dict)

    def reach(self, tau: float = TAU) -> Optional[EvalPoint]:
        return first_reach(self.evals, tau)

    @property
    def final(self) -> EvalPoint:
        return self.evals[-1]


def first_reach(evals: Sequence[EvalPoint], tau: float = TAU) -> Optional[EvalPoint]:
    """The first evaluation whose domain accuracy is >= tau (None: never)."""
    for e in evals:
        if e.domain_acc >= tau:
            return e
    return None


TRAIN_SERIES = ("zero_var_frac", "reward", "reward_probe", "familiarity", "rho", "mean_k_over_l", "lambda_t",
                "gen_tokens", "seq_tokens", "time_step", "imit_nll", "loss")


def _read_generations(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _eval_point(step: int, rec: dict, rows: List[dict], domain: Domain, max_new_tokens: int) -> EvalPoint:
    general = [r for r in rows if r["data_source"] != DOMAIN_SOURCE]
    dom_rows = [r for r in rows if r["data_source"] == DOMAIN_SOURCE]
    if not general or not dom_rows:
        raise ValueError(f"generations of step {step}: expected domain and general answers, got "
                         f"{len(dom_rows)} domain and {len(general)} general")
    new = set(domain.new_symbols)
    per_task = {t: float(rec[f"val/{t}/accuracy"]) for t in GENERAL_TASKS if f"val/{t}/accuracy" in rec}
    sign_off = None
    if domain.sign_off:
        sign_off = sum(r["response"].strip().endswith(domain.sign_off) for r in dom_rows) / len(dom_rows)
    g_succ = [1.0 if r["reward"] >= 1.0 else 0.0 for r in general]
    d_succ = [1.0 if r["reward"] >= 1.0 else 0.0 for r in dom_rows]
    return EvalPoint(step=step, domain_acc=float(rec[f"val/{DOMAIN_SOURCE}/accuracy"]),
                     general_acc=sum(per_task.values()) / len(per_task), per_task=per_task,
                     leak=sum(any(c in new for c in r["response"]) for r in general) / len(general),
                     sign_off_rate=sign_off, general_success=g_succ, domain_success=d_succ,
                     no_stop_general=_no_stop(general, max_new_tokens),
                     no_stop_domain=_no_stop(dom_rows, max_new_tokens))


def _no_stop(rows: List[dict], max_new_tokens: int) -> float:
    """Answers as long as the generation limit: with the character tokenizer (one token per character, EOS
    dropped by decode) these never emitted EOS."""
    return sum(len(r["response"]) >= max_new_tokens for r in rows) / len(rows)


def analyse_run(run_dir: str, domain: Domain, arm: str, seed: int, kl: Optional[Dict[int, Dict[str, float]]] = None,
                max_new_tokens: Optional[int] = None) -> ArmResult:
    """The :class:`ArmResult` of one finished rcpa-train output dir. ``kl``: step -> {"domain", "general"}."""
    recs = read_metrics(run_dir)
    if max_new_tokens is None:
        with open(os.path.join(run_dir, "config.json")) as f:
            max_new_tokens = int(json.load(f)["rollout"]["max_new_tokens"])
    evals: List[EvalPoint] = []
    steps: List[int] = []
    train: Dict[str, List[float]] = {k: [] for k in TRAIN_SERIES}
    for rec in recs:
        step = int(rec["step"])
        if f"val/{DOMAIN_SOURCE}/accuracy" in rec:
            gen_path = os.path.join(run_dir, GENERATIONS_DIR, f"step_{step}.jsonl")
            e = _eval_point(step, rec, _read_generations(gen_path), domain, max_new_tokens)
            if kl and step in kl:
                e.kl_domain, e.kl_general = kl[step].get("domain"), kl[step].get("general")
            evals.append(e)
        if "loss" in rec or "time_step" in rec:  # a training step (step 0's record is the validation only)
            steps.append(step)
            for k in TRAIN_SERIES:
                v = rec.get(k)
                train[k].append(float(v) if isinstance(v, (int, float)) and v is not None else math.nan)
    if not evals:
        raise ValueError(f"{run_dir}: no validation records (val/{DOMAIN_SOURCE}/accuracy) in metrics.jsonl")
    wall = None
    wall_path = os.path.join(run_dir, "wall.json")
    if os.path.isfile(wall_path):
        with open(wall_path) as f:
            wall = float(json.load(f)["wall_s"])
    tot = lambda k: float(sum(v for v in train[k] if not math.isnan(v)))  # noqa: E731
    rewarded = sum(1 for v in train["reward"] if not math.isnan(v) and v > 0)
    return ArmResult(domain=domain.name, arm=arm, seed=seed, evals=evals, steps=steps, train=train, wall_s=wall,
                     gen_tokens=tot("gen_tokens"), seq_tokens=tot("seq_tokens"),
                     extra={"steps_with_reward": float(rewarded)})


def mean_finite(xs: Sequence[float]) -> float:
    v = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(v) / len(v) if v else math.nan
