"""One RCPA step as a short recipe of named phases (RCPA_SPEC sections 2-5).

    prompts -> rollout() -> score() -> advantages() -> logprobs() -> update()

Each phase takes the :class:`StepContext` (the pieces built once: policy, optimizer, engine, ...) and a
:class:`Trajectory` (this data-parallel rank's share of one step's data), fills in its part of the trajectory
and returns it. The trainer (:mod:`megatron_rcpa.train.trainer`) runs the phases one after the other;
the profiler (:mod:`megatron_rcpa.profiling.runner`) times exactly these functions, with synthetic prompts and
rewards. Nothing here reads Megatron's global parallel state: the process groups come in the context.

Batch sizes: ``data.prompts_per_step`` is the GLOBAL number of prompts per step (NeMo-RL's
``num_prompts_per_step``, verl's ``train_batch_size``); each data-parallel rank takes
``prompts_per_step / DP`` of them, ``rcpa.group_size`` rollouts each, and loads only its own samples.
Rewards are gathered over data parallel, so the curriculum and the group advantages (with ``batch_std``, the
std of the whole global batch) see the global batch on every rank.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from megatron_rcpa.algo.curriculum import Curriculum, CurriculumPlan
from megatron_rcpa.rollout.batch import Rollout, RolloutBatch, pack_rollouts
from megatron_rcpa.rollout.engine import PromptInput, RolloutEngine
from megatron_rcpa.train.step import StepConfig, compute_logprobs, split_micro_batches, train_step

__all__ = ["PHASES", "StepContext", "Trajectory", "StepConfigError", "check_batch_layout", "rollout", "score",
           "advantages", "logprobs", "update", "step_metrics", "lr_at"]

PHASES = ("rollout", "score", "advantages", "logprobs", "update")

# rewards for one rank's rollouts: fn(trajectory) -> one float per rollout, in rollout order
RewardFn = Callable[["Trajectory"], List[float]]


class StepConfigError(ValueError):
    """The batch layout of the configuration does not split over the parallel layout (message names the key)."""


@dataclass
class StepContext:
    """What one RL step needs, built once (see :func:`megatron_rcpa.train.trainer.build_step_context`)."""

    cfg: Any  # TrainConfig
    groups: Any  # megatron_rcpa.runtime.parallel.ParallelGroups
    model: torch.nn.Module  # megatron DDP-wrapped policy
    optimizer: Any  # megatron optimizer
    engine: RolloutEngine
    curriculum: Curriculum
    forward_fn: Callable  # the family's forward for the step functions: fn(model, micro-batch dict) -> logits
    micro_batch_inputs: Callable  # the family's vision inputs: fn(prompts, rollouts) -> dict of tensors
    vocab_size: int
    pad_id: int
    impl: str  # "triton" | "torch": the fused kernels or the plain-torch reference
    reference: Optional[torch.nn.Module] = None  # frozen reference policy (rcpa.loss.beta > 0)

    @property
    def prompts_per_rank(self) -> int:
        return self.cfg.data.prompts_per_step // self.groups.dp_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@dataclass
class Trajectory:
    """This data-parallel rank's share of one step, filled in phase by phase."""

    step: int
    prompts: List[PromptInput]  # this rank's prompts
    plan: CurriculumPlan  # the curriculum's plan for the GLOBAL batch (identical on every rank)
    first_prompt: int  # index of this rank's first prompt in the global batch
    samples: List[Any] = field(default_factory=list)  # the data samples behind ``prompts`` (for the reward)
    rollouts: List[Rollout] = field(default_factory=list)  # G per prompt, prompt-major
    rewards: List[float] = field(default_factory=list)  # this rank's rollouts
    all_rewards: List[float] = field(default_factory=list)  # the global batch's, rank-major
    advantages: Optional[torch.Tensor] = None  # this rank's rollouts
    zero_var_frac: float = float("nan")  # over the global batch's groups
    batch: Optional[RolloutBatch] = None
    micro: List[RolloutBatch] = field(default_factory=list)
    extras: List[Dict[str, torch.Tensor]] = field(default_factory=list)  # vision inputs per micro-batch
    old_logp: Optional[List[torch.Tensor]] = None  # last pipeline stage only
    ref_logp: Optional[List[torch.Tensor]] = None
    step_config: Optional[StepConfig] = None

    @property
    def my_prefix_lens(self) -> List[int]:
        return self.plan.k[self.first_prompt:self.first_prompt + len(self.prompts)]


def rows_per_prompt(cfg) -> int:
    """Rollouts per prompt: ``rcpa.group_size``, or 1 in ``run.mode=sft`` (the reference itself)."""
    return 1 if cfg.run.mode == "sft" else cfg.rcpa.group_size


def check_batch_layout(cfg, dp_size: int) -> None:
    """Config errors of the batch layout for ``dp_size`` data-parallel ranks, before any work is done."""
    b, g = cfg.data.prompts_per_step, rows_per_prompt(cfg)
    if b % dp_size:
        raise StepConfigError(f"data.prompts_per_step = {b} (the global number of prompts per step) must be a "
                              f"multiple of the data-parallel size {dp_size}")
    rows = b // dp_size * g
    mbs = min(cfg.optim.micro_batch_size, rows)  # a prompt's rollouts may span micro-batches (train/step.py)
    if rows % mbs:
        raise StepConfigError(f"{rows} rollouts per data-parallel rank (data.prompts_per_step / DP x "
                              f"rcpa.group_size = {b} / {dp_size} x {g}) do not split into micro-batches of "
                              f"optim.micro_batch_size = {mbs}")
    n_micro, n_up = rows // mbs, cfg.optim.updates_per_step
    if n_micro % n_up:
        raise StepConfigError(f"optim.updates_per_step = {n_up} must divide the {n_micro} micro-batches per step "
                              f"({rows} rollouts per rank / optim.micro_batch_size = {mbs})")
    if (n_micro // n_up * mbs) % g:
        # each update is one loss over its micro-batches: a prompt's rollouts must not span two updates
        raise StepConfigError(f"optim.updates_per_step = {n_up}: each update's {n_micro // n_up} micro-batches x "
                              f"optim.micro_batch_size = {mbs} rollouts must be a multiple of rcpa.group_size = "
                              f"{g} (a prompt's rollouts stay in one update)")


def lr_at(cfg, step: int) -> float:
    """The learning rate of (0-based) step ``step``: linear warm-up, then cosine / linear / constant decay."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    x = min(1.0, (step - o.warmup_steps) / max(1, cfg.run.steps - o.warmup_steps))
    if o.lr_schedule == "cosine":
        return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(math.pi * x))
    if o.lr_schedule == "linear":
        return o.lr + (o.min_lr - o.lr) * x
    return o.lr


# --------------------------------------------------------------------------------------------- phases
def plan_step(ctx: StepContext, step: int, prompts: Sequence[PromptInput], samples: Sequence[Any] = ()
              ) -> Trajectory:
    """This rank's prompts -> the curriculum's plan over the GLOBAL batch. Each rank formats only its own
    samples; the prompts' keys and reference lengths are gathered over data parallel (small), so every rank
    makes the identical plan."""
    keys = [str(p.key) for p in prompts]
    lengths = [len(p.reference_ids) if p.reference_ids is not None else None for p in prompts]
    parts = _all_gather_objects((keys, lengths), ctx.groups)
    all_keys = [k for part in parts for k in part[0]]
    all_lengths = [n for part in parts for n in part[1]]
    plan = ctx.curriculum.plan(all_keys, all_lengths)
    return Trajectory(step=step, prompts=list(prompts), plan=plan, first_prompt=ctx.groups.dp_rank * len(prompts),
                      samples=list(samples))


def rollout(ctx: StepContext, traj: Trajectory) -> Trajectory:
    """G rollouts per prompt, each starting with its forced prefix, on the training policy."""
    traj.rollouts = ctx.engine.generate(traj.prompts, traj.my_prefix_lens, ctx.cfg.rcpa.group_size,
                                        step=traj.step, dp_rank=ctx.groups.dp_rank)
    return traj


def imitate(ctx: StepContext, traj: Trajectory) -> Trajectory:
    """``run.mode=sft`` in place of :func:`rollout`: one row per prompt holding its whole reference as the
    forced prefix and nothing generated, so the loss is the imitation NLL of the reference (supervised
    fine-tuning through the same schedule, loss kernels and checkpoints)."""
    rows = []
    for i, p in enumerate(traj.prompts):
        if not p.reference_ids:
            raise ValueError(f"run.mode=sft: prompt {p.key!r} has no reference to imitate")
        rows.append(Rollout(prompt_id=i, prompt_tokens=list(p.prompt_ids), prefix_tokens=list(p.reference_ids),
                            generated_tokens=[], rollout_logp=[]))
    traj.rollouts = rows
    traj.rewards = [0.0] * len(rows)
    traj.all_rewards = [0.0] * (len(rows) * ctx.groups.dp_size)
    return traj


def score(ctx: StepContext, traj: Trajectory, reward_fn: RewardFn) -> Trajectory:
    """Rewards of this rank's rollouts, then the global batch's on every rank (gathered over data parallel)."""
    traj.rewards = [float(r) for r in reward_fn(traj)]
    if len(traj.rewards) != len(traj.rollouts):
        raise ValueError(f"the reward function returned {len(traj.rewards)} rewards for {len(traj.rollouts)} "
                         "rollouts")
    traj.all_rewards = [r for part in _all_gather_objects(traj.rewards, ctx.groups) for r in part]
    return traj


def advantages(ctx: StepContext, traj: Trajectory) -> Trajectory:
    """Group advantages over the GLOBAL batch (so ``batch_std`` is the global std), this rank's rows kept;
    then the rollouts are packed into fixed-shape micro-batches with their vision inputs."""
    from megatron_rcpa.ops import group_advantages

    cfg, g = ctx.cfg, rows_per_prompt(ctx.cfg)
    if cfg.run.mode == "sft":  # nothing generated: no policy-gradient term
        traj.advantages = torch.zeros(len(traj.rollouts))
    else:
        dev = ctx.device  # the Triton kernel needs the rewards on the GPU
        n_all = len(traj.all_rewards)
        rewards = torch.tensor(traj.all_rewards, dtype=torch.float32, device=dev)
        group_ids = torch.arange(n_all // g, device=dev).repeat_interleave(g)
        adv = group_advantages(rewards, group_ids, estimator=cfg.rcpa.advantage.estimator,
                               eps=cfg.rcpa.advantage.eps, batch_std=cfg.rcpa.advantage.batch_std, impl=ctx.impl)
        first = traj.first_prompt * g
        traj.advantages = adv.advantages[first:first + len(traj.rollouts)].float().cpu()
        traj.zero_var_frac = float(adv.zero_var_frac)
    adv_list = traj.advantages.tolist()
    traj.batch = pack_rollouts(traj.rollouts, adv_list, pad_id=ctx.pad_id, pad_to_multiple=8)
    mbs = min(cfg.optim.micro_batch_size, traj.batch.num_rollouts)
    traj.micro = split_micro_batches(traj.batch, mbs, g)  # checks the layout too
    rows = [list(range(i, i + mbs)) for i in range(0, traj.batch.num_rollouts, mbs)]
    if cfg.optim.length_buckets and ctx.groups.pp_size == 1 and len(rows) > 1:
        # whole groups sorted by length, each micro-batch padded only to its own longest rollout (pipeline
        # parallelism needs one shape for all micro-batches, so PP > 1 keeps the batch-wide padding)
        order = _groups_by_length(traj.rollouts, g)
        rows = [order[i:i + mbs] for i in range(0, len(order), mbs)]
        traj.micro = [pack_rollouts([traj.rollouts[r] for r in rs], [adv_list[r] for r in rs], pad_id=ctx.pad_id,
                                    pad_to_multiple=8) for rs in rows]
    traj.extras = [ctx.micro_batch_inputs(traj.prompts, [traj.rollouts[r] for r in rs]) for rs in rows]
    return traj


def _groups_by_length(rollouts: Sequence[Rollout], group_size: int) -> List[int]:
    """Rollout indices, whole groups (consecutive ``group_size`` rows) ordered by their longest rollout
    (longest first; ties keep their order)."""
    n_groups = len(rollouts) // group_size
    longest = [max(len(rollouts[i * group_size + j].tokens) for j in range(group_size)) for i in range(n_groups)]
    ranked = sorted(range(n_groups), key=lambda i: -longest[i])
    return [i * group_size + j for i in ranked for j in range(group_size)]


def recompute_old_logp(cfg) -> bool:
    """Whether the old-policy log-probs need their own forward pass: with several updates per step (the policy
    moves between them) or when asked (``optim.recompute_old_logp=always``). With one update the old policy is
    the current one, and the training forward gives its log-probs (train/step.py)."""
    return cfg.optim.recompute_old_logp == "always" or cfg.optim.updates_per_step > 1


def logprobs(ctx: StepContext, traj: Trajectory, lambda_t: Optional[float] = None) -> Trajectory:
    """Old-policy (when :func:`recompute_old_logp`) and reference (when beta > 0) per-token log-probs through
    the pipeline schedule. The imitation weight is the curriculum's lambda_t unless ``lambda_t`` is given
    (the profiler fixes it)."""
    cfg = ctx.cfg
    if lambda_t is None:
        lambda_t = 1.0 if cfg.run.mode == "sft" else ctx.curriculum.lambda_t(cfg.rcpa.loss.lambda_0)
    traj.step_config = StepConfig(loss=cfg.rcpa.loss, lambda_t=lambda_t,
                                  temperature=cfg.rollout.temperature, vocab_size=ctx.vocab_size, impl=ctx.impl)
    traj.old_logp = None
    if recompute_old_logp(cfg):
        traj.old_logp = compute_logprobs(ctx.model, traj.micro, traj.step_config, ctx.forward_fn,
                                         extras=traj.extras, groups=ctx.groups)
    traj.ref_logp = (compute_logprobs(ctx.reference, traj.micro, traj.step_config, ctx.forward_fn,
                                      extras=traj.extras, groups=ctx.groups)
                     if ctx.reference is not None else None)
    return traj


def update(ctx: StepContext, traj: Trajectory, optimizer: Any = None) -> Dict[str, float]:
    """``optim.updates_per_step`` optimizer updates over the micro-batches (the RCPA loss through megatron's
    schedule and DDP); returns the train metrics averaged over the updates. ``optimizer`` overrides the
    context's (the profiler passes a timing wrapper)."""
    cfg = ctx.cfg
    optimizer = optimizer if optimizer is not None else ctx.optimizer
    for group in optimizer.param_groups:
        group["lr"] = lr_at(cfg, traj.step)
    n_micro, n_up = len(traj.micro), cfg.optim.updates_per_step
    if n_micro % n_up:
        raise StepConfigError(f"optim.updates_per_step = {n_up} must divide the {n_micro} micro-batches per step")
    per = n_micro // n_up
    out: Dict[str, float] = {}
    for u in range(0, n_micro, per):
        sl = slice(u, u + per)
        m = train_step(ctx.model, optimizer, traj.micro[sl], traj.old_logp[sl] if traj.old_logp is not None else None,
                       traj.step_config, ref_logp=traj.ref_logp[sl] if traj.ref_logp is not None else None,
                       forward_fn=ctx.forward_fn, extras=traj.extras[sl], groups=ctx.groups)
        for k, v in m.items():
            out[k] = out.get(k, 0.0) + v / n_up
    return out


def step_metrics(ctx: StepContext, traj: Trajectory, train_metrics: Dict[str, float],
                 curriculum_metrics: Dict[str, float], times: Dict[str, float]) -> Dict[str, Any]:
    """The per-step metrics record (RCPA_SPEC section 5) from a finished trajectory."""
    batch = traj.batch
    gen_tokens = float(batch.gen_mask.sum())
    metrics: Dict[str, Any] = dict(curriculum_metrics)
    metrics.update(train_metrics)
    if traj.old_logp is not None:  # this rank's rollouts vs the recompute (else the loss reported it)
        diff = sum(float(((o.float().cpu() - m.rollout_logp).abs() * m.gen_mask).sum())
                   for o, m in zip(traj.old_logp, traj.micro))
        metrics["logp_mismatch"] = diff / max(gen_tokens, 1.0)
    padded = sum(m.tokens.numel() for m in traj.micro)
    total = sum(times.values())
    metrics.update({
        "lambda_t": traj.step_config.lambda_t, "zero_var_frac": traj.zero_var_frac, "lr": lr_at(ctx.cfg, traj.step),
        "response_length": statistics.mean(len(r.response_tokens) for r in traj.rollouts),
        "gen_tokens": gen_tokens * ctx.groups.dp_size, "seq_tokens": float(batch.lengths.sum()) * ctx.groups.dp_size,
        "padding_frac": 1.0 - float(batch.lengths.sum()) / max(padded, 1), "time_rollout": times.get("rollout", 0.0),
        "time_logprob": times.get("logprob", 0.0), "time_train": times.get("train", 0.0), "time_step": total,
        "tokens_per_s": float(batch.lengths.sum()) * ctx.groups.dp_size / max(total, 1e-9),
    })
    if torch.cuda.is_available():  # this rank's GPU memory (the logging rank: a last pipeline stage)
        metrics["memory_allocated_gb"] = torch.cuda.memory_allocated() / 2**30
        metrics["memory_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return metrics


def _all_gather_objects(obj: Any, groups) -> List[Any]:
    """``obj`` of every data-parallel rank, in rank order."""
    if groups.dp_size == 1:
        return [obj]
    out: List[Any] = [None] * groups.dp_size
    torch.distributed.all_gather_object(out, obj, group=groups.dp_group)
    return out
