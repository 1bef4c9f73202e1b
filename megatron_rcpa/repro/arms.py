"""The arms of the reproduction and the presets that size them.

Every arm starts from the same base checkpoint and runs the same number of steps on the same prompts per step
with the same optimizer and learning rate (an SFT LR sweep on the GPU preset is the one exception, on
purpose); they differ only in what the trainer does with each prompt:

==============  ==================================================================================================
arm             trainer settings
==============  ==================================================================================================
sft             ``run.mode=sft``: imitation of the whole reference, no rollouts
grpo            ``rcpa.curriculum.schedule=constant rho_max=0``: never a forced prefix, lambda_t = 0 (plain GRPO)
fixed_rho       ``schedule=constant rho_max=0.5 kappa=0``: every non-probe prompt forced to half its reference,
                imitation weight constant (no curriculum at all: no familiarity schedule, no per-prompt weight)
rcpa            the spec defaults (familiarity schedule, rho_max 0.9, probes 0.25, ratchet, lambda_0 = 1)
rcpa_kl         RCPA + KL to the base (beta 0.05, k3)                                       (GPU preset)
rcpa_no_imit    RCPA without the imitation term (lambda_0 = 0)                              (GPU preset)
sft_lr<x>       SFT at x times the shared learning rate             (GPU preset: 0.3, 3; CPU preset: 0.1, 0.3)
==============  ==================================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

__all__ = ["Arm", "Preset", "PRESETS", "arms_for", "SFT_FAMILY"]


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: Tuple[str, ...]  # rcpa-train key=value on top of the preset's shared ones
    kind: str  # "sft" | "rl": which family of arm (SFT arms form the LR sweep)
    label: str


SFT_FAMILY = "sft"


def _arm_table(lr: float, sweep: Tuple[float, ...]) -> Dict[str, Arm]:
    arms = {
        "sft": Arm("sft", ("run.mode=sft",), "sft", "SFT"),
        "grpo": Arm("grpo", ("rcpa.curriculum.schedule=constant", "rcpa.curriculum.rho_max=0.0"), "rl",
                    "GRPO (rho=0)"),
        "fixed_rho": Arm("fixed_rho", ("rcpa.curriculum.schedule=constant", "rcpa.curriculum.rho_max=0.5",
                                       "rcpa.curriculum.kappa=0.0"), "rl", "fixed rho=0.5"),
        "rcpa": Arm("rcpa", (), "rl", "RCPA"),
        "rcpa_kl": Arm("rcpa_kl", ("rcpa.loss.beta=0.05", "rcpa.loss.kl_type=k3"), "rl", "RCPA + KL (0.05, k3)"),
        "rcpa_no_imit": Arm("rcpa_no_imit", ("rcpa.loss.lambda_0=0.0",), "rl", "RCPA, lambda_0=0"),
    }
    for mult in sweep:
        name = f"sft_lr{mult:g}"
        arms[name] = Arm(name, ("run.mode=sft", f"optim.lr={lr * mult!r}"), "sft", f"SFT lr x{mult:g}")
    return arms


@dataclass(frozen=True)
class Preset:
    """Everything that sizes a reproduction run (see the module docstring for the arms)."""

    name: str
    arms: Tuple[str, ...]
    seeds: Tuple[int, ...]
    # model
    hidden_size: int
    num_layers: int
    # data
    train_per_source: int  # distinct training prompts per general task / for the domain
    val_per_source: int  # held-out prompts per general task and for the domain
    # pretraining (run.mode=sft on the general mix) until general accuracy >= pretrain_target
    pretrain_lr: float
    pretrain_prompts: int
    pretrain_steps: int  # the first run: cosine decay from pretrain_lr to pretrain_lr / 10
    pretrain_chunk: int  # then steps at pretrain_lr / 10 between accuracy checks
    pretrain_max_steps: int
    pretrain_target: float
    # arms
    steps: int
    prompts_per_step: int
    group_size: int
    lr: float
    val_interval: int  # steps between greedy validations
    kl_interval: int  # steps between checkpoints (the token KL to the base is computed on each)
    max_new_tokens: int
    jobs: int  # arm runs at once
    sft_lr_sweep: Tuple[float, ...] = ()
    device_overrides: Tuple[str, ...] = field(default=())

    def arm_table(self) -> Dict[str, Arm]:
        return _arm_table(self.lr, self.sft_lr_sweep)


_MODEL = dict(hidden_size=128, num_layers=3)
_PRETRAIN = dict(pretrain_lr=1e-3, pretrain_prompts=64, pretrain_steps=1600, pretrain_chunk=400,
                 pretrain_max_steps=4000, pretrain_target=0.98)
_ARMS = dict(steps=200, prompts_per_step=8, group_size=8, lr=1e-3, val_interval=10, kl_interval=10,
             max_new_tokens=12)

PRESETS: Dict[str, Preset] = {
    # one seed, four arms (+ SFT at 0.1x and 0.3x the LR: cheap), D1 and D2, 2 CPU cores, <= 30 minutes
    # (docs/repro/REPORT.md has the measured time)
    "cpu": Preset(name="cpu", arms=("sft", "grpo", "fixed_rho", "rcpa"), seeds=(0,), train_per_source=2000,
                  val_per_source=40, jobs=2, sft_lr_sweep=(0.1, 0.3), **_MODEL, **_PRETRAIN, **_ARMS),
    # three seeds and the extra arms (RCPA + KL, RCPA without imitation, an SFT LR sweep) on one GPU
    "gpu": Preset(name="gpu", arms=("sft", "grpo", "fixed_rho", "rcpa", "rcpa_kl", "rcpa_no_imit"), seeds=(0, 1, 2),
                  train_per_source=2000, val_per_source=100, jobs=4, sft_lr_sweep=(0.3, 3.0), **_MODEL,
                  **_PRETRAIN, **_ARMS),
    # the pipeline end to end in a few minutes on a CPU (mechanics only: the numbers mean nothing)
    "smoke": Preset(name="smoke", arms=("sft", "grpo", "fixed_rho", "rcpa"), seeds=(0,), hidden_size=32, num_layers=1,
                    train_per_source=64, val_per_source=8, pretrain_lr=3e-3, pretrain_prompts=16, pretrain_steps=4,
                    pretrain_chunk=4, pretrain_max_steps=8, pretrain_target=0.98, steps=4, prompts_per_step=4,
                    group_size=4, lr=1e-3, val_interval=2, kl_interval=2, max_new_tokens=10, jobs=2),
}


def arms_for(preset: Preset) -> List[Arm]:
    """The preset's arms, its SFT LR sweep included."""
    table = preset.arm_table()
    names = list(preset.arms) + [f"sft_lr{m:g}" for m in preset.sft_lr_sweep]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"preset {preset.name!r}: unknown arms {unknown}; known: {sorted(table)}")
    return [table[n] for n in names]
