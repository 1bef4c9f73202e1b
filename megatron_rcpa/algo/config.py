"""Configuration of the RCPA method: every default of RCPA_SPEC section 6 lives here, once.

The dataclasses validate themselves on construction: an invalid value raises ``ValueError`` naming the
field, the value and the allowed range, e.g.::

    ValueError: CurriculumConfig.rho_max = 1.2 is out of range: expected 0 <= rho_max < 1
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .registry import ADVANTAGE_ESTIMATORS, AGGREGATIONS, KL_ESTIMATORS

RATIO_LEVELS = ("token", "sequence")
SCHEDULES = ("familiarity", "step_linear", "step_cosine", "step_exponential", "constant")
FAMILIARITY_SIGNALS = ("reward", "success")


def fail(owner: str, name: str, value: Any, expected: str) -> None:
    raise ValueError(f"{owner}.{name} = {value!r} is out of range: expected {expected}")


def check_real(owner: str, name: str, value: Any, lo=None, hi=None, lo_open=False, hi_open=False) -> None:
    """Check that ``value`` is a finite real number inside [lo, hi] (open ends where asked)."""
    lo_s = "" if lo is None else f"{lo} {'<' if lo_open else '<='} "
    hi_s = "" if hi is None else f" {'<' if hi_open else '<='} {hi}"
    expected = f"{lo_s}{name}{hi_s}" if (lo is not None or hi is not None) else "a finite number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(owner, name, value, f"a finite number with {expected}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        fail(owner, name, value, expected)
    if hi is not None and (value > hi or (hi_open and value == hi)):
        fail(owner, name, value, expected)


def check_int(owner: str, name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        fail(owner, name, value, f"an integer >= {lo}")


def check_choice(owner: str, name: str, value: Any, choices) -> None:
    if value not in choices:
        fail(owner, name, value, "one of " + ", ".join(repr(c) for c in choices))


@dataclass
class AdvantageConfig:
    """Group advantage estimation (RCPA_SPEC section 4, "Advantages")."""

    estimator: str = "grpo"  # a name in registry.ADVANTAGE_ESTIMATORS
    eps: float = 1e-6  # added to the (unbiased) std for grpo
    batch_std: bool = False  # divide by the std of the whole batch instead of the group's (grpo only)

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_choice(o, "estimator", self.estimator, ADVANTAGE_ESTIMATORS)
        check_real(o, "eps", self.eps, lo=0.0)
        if not isinstance(self.batch_std, bool):
            fail(o, "batch_std", self.batch_std, "true or false")


@dataclass
class LossConfig:
    """The RCPA loss (RCPA_SPEC section 4): L = L_pg + beta*L_kl - alpha*H + lambda_t*L_imit."""

    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: Optional[float] = None  # c > 1: cap of -A*r for negative advantages; None = off
    ratio_level: str = "token"  # token | sequence (GSPO: geometric mean of the ratio over the sequence)
    beta: float = 0.0  # KL-to-reference weight
    kl_type: str = "k3"  # a name in registry.KL_ESTIMATORS
    alpha: float = 0.0  # entropy bonus weight
    lambda_0: float = 1.0  # imitation weight at rho_t = rho_max
    aggregation: str = "token_mean"  # a name in registry.AGGREGATIONS
    max_response_length: Optional[int] = None  # the fixed divisor of seq_mean_token_sum_norm (Dr.GRPO)

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_real(o, "eps_low", self.eps_low, lo=0.0, hi=1.0, hi_open=True)
        check_real(o, "eps_high", self.eps_high, lo=0.0)
        if self.dual_clip is not None:
            check_real(o, "dual_clip", self.dual_clip, lo=1.0, lo_open=True)
        check_choice(o, "ratio_level", self.ratio_level, RATIO_LEVELS)
        check_real(o, "beta", self.beta, lo=0.0)
        check_choice(o, "kl_type", self.kl_type, KL_ESTIMATORS)
        check_real(o, "alpha", self.alpha, lo=0.0)
        check_real(o, "lambda_0", self.lambda_0, lo=0.0)
        check_choice(o, "aggregation", self.aggregation, AGGREGATIONS)
        if self.max_response_length is not None:
            check_int(o, "max_response_length", self.max_response_length, 1)
        if AGGREGATIONS.get(self.aggregation).needs_max_response_length and self.max_response_length is None:
            fail(o, "max_response_length", None, f"an integer >= 1 when aggregation = {self.aggregation!r}")


@dataclass
class CurriculumConfig:
    """The curriculum (RCPA_SPEC sections 2-3): global level rho_t and per-prompt difficulty."""

    schedule: str = "familiarity"  # familiarity | step_linear | step_cosine | step_exponential | constant
    rho_max: float = 0.9
    probe_fraction: float = 0.25
    f_low: float = 0.05
    f_high: float = 0.6
    gamma: float = 1.0
    kappa: float = 1.0
    ema: float = 0.9  # decay of the familiarity and per-prompt EMAs: new = ema*old + (1-ema)*x
    settle_steps: int = 20
    ratchet: bool = True
    decay_steps: int = 1000  # length of the step_* schedules
    familiarity_signal: str = "reward"  # reward (mean reward, clipped to [0, 1]) | success (reward >= threshold)
    success_threshold: float = 0.5
    initial_familiarity: float = 0.0
    seed: int = 0  # seeds the choice of probe prompts

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_choice(o, "schedule", self.schedule, SCHEDULES)
        check_real(o, "rho_max", self.rho_max, lo=0.0, hi=1.0, hi_open=True)
        check_real(o, "probe_fraction", self.probe_fraction, lo=0.0, hi=1.0)
        check_real(o, "f_low", self.f_low, lo=0.0, hi=1.0)
        check_real(o, "f_high", self.f_high, lo=0.0, hi=1.0)
        if not self.f_high > self.f_low:
            fail(o, "f_high", self.f_high, f"f_high > f_low = {self.f_low}")
        check_real(o, "gamma", self.gamma, lo=0.0, lo_open=True)
        check_real(o, "kappa", self.kappa, lo=0.0)
        check_real(o, "ema", self.ema, lo=0.0, hi=1.0, hi_open=True)
        check_int(o, "settle_steps", self.settle_steps, 0)
        if not isinstance(self.ratchet, bool):
            fail(o, "ratchet", self.ratchet, "true or false")
        check_int(o, "decay_steps", self.decay_steps, 1)
        check_choice(o, "familiarity_signal", self.familiarity_signal, FAMILIARITY_SIGNALS)
        check_real(o, "success_threshold", self.success_threshold)
        check_real(o, "initial_familiarity", self.initial_familiarity, lo=0.0, hi=1.0)
        check_int(o, "seed", self.seed, 0)


@dataclass
class RCPAConfig:
    """The whole method: group size plus the three parts above."""

    group_size: int = 8  # G rollouts per prompt
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)

    def __post_init__(self) -> None:
        check_int(type(self).__name__, "group_size", self.group_size, 1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RCPAConfig:
        """Build from a nested mapping; an unknown key raises ValueError naming it and the known ones."""
        return _from_dict(cls, d, cls.__name__)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _from_dict(cls, d: Mapping[str, Any], where: str):
    """Build dataclass ``cls`` from a nested mapping; nested dataclass fields recurse. Errors name the
    dotted key (``where.key``) and list the known keys."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(d).__name__} {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key not in fields:
            raise ValueError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(fields))}")
        sub = hints.get(key)
        if dataclasses.is_dataclass(sub) and isinstance(sub, type):
            kwargs[key] = _from_dict(sub, value, f"{where}.{key}")
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except ValueError as e:  # name the dotted section too: "config.rcpa.curriculum: CurriculumConfig.rho_max = 2 ..."
        raise ValueError(f"{where}: {e}") from None


from_dict = _from_dict
