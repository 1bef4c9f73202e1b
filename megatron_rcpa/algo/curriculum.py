"""The RCPA curriculum (RCPA_SPEC sections 2-3): how long a ground-truth prefix each prompt is forced to.

Each step:

1. :meth:`Curriculum.plan` picks the probe prompts (sampled unconstrained, k = 0) and, for the others,
   the prefix length ``k_i = floor(rho_i * L_i)`` with ``rho_i = rho_t * w(d_i)``,
   ``w(d) = max(0, 1 - d) ** kappa`` and ``d_i`` the prompt's success EMA.
2. rollouts and rewards happen elsewhere;
3. :meth:`Curriculum.update` folds the rewards in: familiarity ``f_t`` (EMA of the probes' mean reward or
   success rate), per-prompt success EMAs, the next global level ``rho_t`` (familiarity-driven with a
   ratchet, or a step schedule) and the phase (``pre_alignment`` until rho_t has been 0 for
   ``settle_steps`` updates, then ``reinforcement_alignment``).

``state_dict()`` / ``load_state_dict()`` round-trip exactly (plain Python numbers and a dict).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Sequence

import torch

from .config import CurriculumConfig

PRE_ALIGNMENT = "pre_alignment"
REINFORCEMENT_ALIGNMENT = "reinforcement_alignment"
_EXP_RATE = 5.0  # step_exponential: rho_max * (e^{-5x} - e^{-5}) / (1 - e^{-5}), reaching 0 at decay_steps


@dataclass
class CurriculumPlan:
    """What the curriculum decided for one batch of prompts (one entry per prompt)."""

    step: int
    keys: List[Hashable]
    lengths: List[Optional[int]]  # reference lengths L_i (None: no reference)
    is_probe: List[bool]
    difficulty: List[float]  # d_i used (the batch level for unseen prompts)
    rho: List[float]  # rho_i
    k: List[int]  # forced prefix lengths
    rho_t: float

    @property
    def mean_k_over_l(self) -> float:
        fr = [k / n for k, n in zip(self.k, self.lengths) if n]
        return sum(fr) / len(fr) if fr else 0.0


def schedule_value(config: CurriculumConfig, step: int, familiarity: float) -> float:
    """rho_t before the ratchet, for the configured schedule."""
    c = config
    if c.schedule == "familiarity":
        x = min(max((familiarity - c.f_low) / (c.f_high - c.f_low), 0.0), 1.0)
        return c.rho_max * (1.0 - x) ** c.gamma
    if c.schedule == "constant":
        return c.rho_max
    x = min(step / c.decay_steps, 1.0)
    if c.schedule == "step_linear":
        return c.rho_max * (1.0 - x)
    if c.schedule == "step_cosine":
        return max(0.0, c.rho_max * 0.5 * (1.0 + math.cos(math.pi * x)))
    if c.schedule == "step_exponential":
        lo = math.exp(-_EXP_RATE)
        return max(0.0, c.rho_max * (math.exp(-_EXP_RATE * x) - lo) / (1.0 - lo))
    raise ValueError(f"CurriculumConfig.schedule = {c.schedule!r} is unknown")


class Curriculum:
    def __init__(self, config: Optional[CurriculumConfig] = None):
        self.config = config or CurriculumConfig()
        self.step = 0
        self.familiarity = float(self.config.initial_familiarity)
        self.rho = schedule_value(self.config, 0, self.familiarity)
        self.zero_steps = 0
        self.switch_step: Optional[int] = None
        self.phase = PRE_ALIGNMENT
        self.difficulty: Dict[Hashable, float] = {}
        self._advance_phase(count=False)

    # ------------------------------------------------------------------ planning
    def success(self, reward: float) -> float:
        """A rollout's success in [0, 1]: its reward clipped, or reward >= threshold (familiarity_signal)."""
        if self.config.familiarity_signal == "success":
            return 1.0 if reward >= self.config.success_threshold else 0.0
        return min(max(float(reward), 0.0), 1.0)

    def weight(self, d: float) -> float:
        return max(0.0, 1.0 - d) ** self.config.kappa

    def num_probes(self, batch: int) -> int:
        pf = self.config.probe_fraction
        if pf <= 0 or batch == 0:
            return 0
        return min(batch, max(1, int(math.floor(pf * batch + 0.5))))

    def batch_level(self, keys: Sequence[Hashable]) -> float:
        seen = [self.difficulty[k] for k in keys if k in self.difficulty]
        return sum(seen) / len(seen) if seen else self.familiarity

    def plan(self, keys: Sequence[Hashable], lengths: Sequence[Optional[int]]) -> CurriculumPlan:
        """Decide the probes and prefix lengths for a batch of prompts (keys identify prompts across steps)."""
        if len(keys) != len(lengths):
            raise ValueError(f"plan: {len(keys)} prompt keys but {len(lengths)} reference lengths")
        b = len(keys)
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.step)
        probes = set(torch.randperm(b, generator=gen)[: self.num_probes(b)].tolist())
        level = self.batch_level(keys)
        out = CurriculumPlan(self.step, list(keys), list(lengths), [], [], [], [], self.rho)
        for i, (key, n) in enumerate(zip(keys, lengths)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
                raise ValueError(f"plan: reference length of prompt {key!r} = {n!r}, expected an integer >= 0")
            d = self.difficulty.get(key, level)
            rho_i = 0.0 if i in probes else min(self.config.rho_max, self.rho * self.weight(d))
            if n is None and rho_i > 0:
                raise ValueError(f"prompt {key!r} has no reference but the curriculum asks for a prefix "
                                 f"(rho_i = {rho_i:.3f}); samples without a reference need rho = 0")
            out.is_probe.append(i in probes)
            out.difficulty.append(d)
            out.rho.append(rho_i)
            out.k.append(int(math.floor(rho_i * n)) if n else 0)
        return out

    # ------------------------------------------------------------------ update
    def update(self, plan: CurriculumPlan, rewards: Sequence[Sequence[float]]) -> Dict[str, float]:
        """Fold in the rewards of the planned batch (``rewards[i]`` = the G rewards of prompt i) and move
        to the next step. Returns the curriculum metrics of RCPA_SPEC section 5."""
        if plan.step != self.step:
            raise ValueError(f"update: plan is for step {plan.step} but the curriculum is at step {self.step}")
        if len(rewards) != len(plan.keys):
            raise ValueError(f"update: {len(rewards)} reward groups for {len(plan.keys)} planned prompts")
        ema = self.config.ema
        succ, all_r, probe_r, cons_r = [], [], [], []
        for key, group in zip(plan.keys, rewards):
            group = [float(r) for r in group]
            if not group:
                raise ValueError(f"update: prompt {key!r} has no rewards")
            bad = [r for r in group if not math.isfinite(r)]
            if bad:
                raise ValueError(f"update: prompt {key!r} has a non-finite reward {bad[0]}")
            succ.append(sum(self.success(r) for r in group) / len(group))
            all_r += group
        for i, group in enumerate(rewards):
            (probe_r if plan.is_probe[i] else cons_r).extend(float(r) for r in group)
        probe_s = [s for s, p in zip(succ, plan.is_probe) if p]
        if probe_s:
            self.familiarity = ema * self.familiarity + (1.0 - ema) * (sum(probe_s) / len(probe_s))
        for key, d0, s in zip(plan.keys, plan.difficulty, succ):
            self.difficulty[key] = ema * self.difficulty.get(key, d0) + (1.0 - ema) * s

        self.step += 1
        new = schedule_value(self.config, self.step, self.familiarity)
        self.rho = min(self.rho, new) if self.config.ratchet else new
        self._advance_phase(count=True)
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        return {
            "reward": mean(all_r),
            "reward_probe": mean(probe_r),
            "reward_constrained": mean(cons_r),
            "familiarity": self.familiarity,
            "rho": self.rho,
            "mean_k_over_l": plan.mean_k_over_l,
            "phase": 0.0 if self.phase == PRE_ALIGNMENT else 1.0,
        }

    def _advance_phase(self, count: bool) -> None:
        if self.rho > 0.0:
            self.zero_steps = 0
            self.phase = PRE_ALIGNMENT
            return
        if count:
            self.zero_steps += 1
        if self.zero_steps >= self.config.settle_steps and self.phase != REINFORCEMENT_ALIGNMENT:
            self.phase = REINFORCEMENT_ALIGNMENT
            self.switch_step = self.step

    def lambda_t(self, lambda_0: float) -> float:
        """Imitation weight lambda_0 * rho_t / rho_max: fades with the constraint, 0 once rho_t is 0."""
        return lambda_0 * self.rho / self.config.rho_max if self.config.rho_max > 0 else 0.0

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {
            "config": dataclasses.asdict(self.config),
            "step": self.step,
            "familiarity": self.familiarity,
            "rho": self.rho,
            "zero_steps": self.zero_steps,
            "switch_step": self.switch_step,
            "phase": self.phase,
            "difficulty": dict(self.difficulty),
        }

    def load_state_dict(self, state: dict) -> None:
        expected = {"config", "step", "familiarity", "rho", "zero_steps", "switch_step", "phase", "difficulty"}
        missing = expected - set(state)
        if missing:
            raise ValueError(f"curriculum state is missing keys {sorted(missing)}")
        now = dataclasses.asdict(self.config)
        changed = sorted(k for k, v in state["config"].items() if now.get(k) != v)
        if changed:  # a resumed run may change the curriculum on purpose; the saved state still applies
            warnings.warn(f"curriculum config differs from the checkpoint's in {changed}; keeping the new values")
        self.step = int(state["step"])
        self.familiarity = float(state["familiarity"])
        self.rho = float(state["rho"])
        self.zero_steps = int(state["zero_steps"])
        self.switch_step = None if state["switch_step"] is None else int(state["switch_step"])
        self.phase = str(state["phase"])
        self.difficulty = dict(state["difficulty"])
