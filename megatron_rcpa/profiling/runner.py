"""Time the trainer's own RCPA step, phase by phase (driven by tools/profile_throughput.py).

The step is built and run exactly as ``rcpa-train`` runs it: :func:`megatron_rcpa.train.trainer.build_step_context`
builds the policy (every trainer family), DDP, optimizer, reference model and rollout engine, and the phase
functions of :mod:`megatron_rcpa.train.phases` run on this rank's share of the batch (``data.prompts_per_step /
DP`` prompts, ``rcpa.group_size`` rollouts each). They are timed as

1. **rollout** - ``phases.rollout`` (KV-cache decode on the training policy), ``phases.score`` and
   ``phases.advantages`` (group advantages, packing into micro-batches);
2. **logprob** - ``phases.logprobs``: the old policy, and the frozen reference when ``rcpa.loss.beta > 0``;
3. **train** - ``phases.update``: forward + backward over the micro-batches (``optim.micro_batch_size``)
   through megatron's schedule and DDP, the fused RCPA loss;
4. **optimizer** - the optimizer step inside it (grad clipping, Adam), timed apart through a thin wrapper.

What is synthetic, because the phase costs do not depend on it: prompts are random text of ``prompt_len``
tokens in the family's prompt format (plus one random image of ``data.image_size`` pixels a side per prompt for
a VLM), the forced prefix is ``prefix_len`` tokens of a random reference on every prompt (no curriculum),
every rollout generates exactly ``max_new_tokens`` (no EOS: the worst case the rollout engine must provision
for), rewards are random, and the weights are random unless ``load_weights`` (bf16 and torchao FP8: a converted
checkpoint holds local-spec names, not TE ones). Reward computation (CPU, text) is not timed.

Precision: each run sets ``model.fp8`` from its :class:`~megatron_rcpa.profiling.precision.PrecisionRun` (off for
bf16; ``backend``/``recipe`` for fp8), whatever the config file says, and builds the policy through the trainer's
``build_policy`` (:mod:`megatron_rcpa.models.fp8`).

Distributed: under ``torchrun`` the real process group is used (NCCL on GPUs), with ``parallel.tp`` and
``parallel.pp`` from the config. A plain ``python`` start is one process (gloo on a CPU, with the CPU shim).
Per-phase times are the max over ranks; tokens and FLOPs are summed over data-parallel replicas; per-GPU rates
divide by the world size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from megatron_rcpa.profiling.flops import DecoderShape, VisionShape, logprob_flops, rollout_flops, train_flops
from megatron_rcpa.profiling.peaks import DeviceInfo, resolve_peak
from megatron_rcpa.profiling.precision import PrecisionRun, fp8_config_overrides
from megatron_rcpa.profiling.report import build_run, phase_record
from megatron_rcpa.profiling.timer import PhaseTimer

__all__ = ["PHASES", "ProfileConfigError", "ProfileSettings", "megatron_session", "profile_precision"]

PHASES = ("rollout", "logprob", "train", "optimizer")


class ProfileConfigError(ValueError):
    """The configuration or flags ask for something the profiler cannot run (the message names the key)."""


@dataclasses.dataclass
class ProfileSettings:
    steps: int = 5
    warmup: int = 1
    prompt_len: int = 64  # text tokens per prompt (a VLM prompt adds its image tokens)
    prefix_len: int = 0  # of them, the last ones marked as the forced RCPA prefix (imitation term)
    attention: str = "full"  # FLOP convention, see megatron_rcpa.profiling.flops
    loss_impl: str = "auto"  # auto (triton on a GPU, torch on a CPU) | triton | torch
    gpu: Optional[str] = None  # peak-table key overriding detection
    peak_tflops: Optional[float] = None
    load_weights: bool = False
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ProfileConfigError(f"--steps {self.steps}: must be >= 1")
        if self.warmup < 0:
            raise ProfileConfigError(f"--warmup {self.warmup}: must be >= 0")
        if self.prompt_len < 1:
            raise ProfileConfigError(f"--prompt-len {self.prompt_len}: must be >= 1")
        if not 0 <= self.prefix_len < self.prompt_len:
            raise ProfileConfigError(f"--prefix-len {self.prefix_len}: must be >= 0 and < --prompt-len "
                                     f"{self.prompt_len}")
        if self.loss_impl not in ("auto", "triton", "torch"):
            raise ProfileConfigError(f"--loss-impl {self.loss_impl!r}: expected auto, triton or torch")


# ----------------------------------------------------------------------------------------- process group
@contextlib.contextmanager
def megatron_session(tp: int, pp: int, seed: int, timeout_s: float = 3600.0):
    """torch.distributed + megatron parallel_state for the profile: torchrun's group when launched by it (env
    ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``), else one in-process rank. Tears down what it set up."""
    from megatron_rcpa.runtime.cpu_shim import install_cpu_shim, uninstall_cpu_shim

    cuda = torch.cuda.is_available()
    shimmed = install_cpu_shim()  # a no-op with CUDA
    timeout = datetime.timedelta(seconds=timeout_s)
    created_pg = created_ps = False
    dist = torch.distributed
    try:
        if not dist.is_initialized():
            backend = "nccl" if cuda else "gloo"
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
            if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
                dist.init_process_group(backend, timeout=timeout)
            else:
                store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timeout)
                dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
            created_pg = True
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        world = dist.get_world_size()
        if world % (tp * pp):
            raise ProfileConfigError(f"parallel.tp = {tp} x parallel.pp = {pp} does not divide the world size {world}")
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
            created_ps = True
        install_cpu_shim()  # re-scan megatron modules imported just now (no-op with CUDA)
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
        yield
    finally:
        if created_ps:
            from megatron.core import parallel_state as ps

            ps.destroy_model_parallel()
        if created_pg:
            dist.destroy_process_group()
        if shimmed:
            uninstall_cpu_shim()


# ----------------------------------------------------------------------------------------------- prompts
def synthetic_samples(tok, cfg, settings: ProfileSettings, num: int, first_id: int, generator: torch.Generator,
                      with_images: bool) -> List[Any]:
    """``num`` data samples of random text (``settings.prompt_len`` tokens of the run's tokenizer, exact for
    the character tokenizer, at most that for BPE), one random image each for a VLM, and a reference of
    ``settings.prefix_len`` tokens (the forced prefix). They go through the family's prompt format like real
    data."""
    import numpy as np
    from PIL import Image

    from megatron_rcpa.data.sample import Sample

    letters = "abcdefghijklmnopqrstuvwxyz"

    def text(n_tokens: int) -> str:
        if n_tokens == 0:
            return ""
        draw = torch.randint(0, len(letters), (4 * n_tokens,), generator=generator).tolist()
        words = " ".join("".join(letters[c] for c in draw[i:i + 3]) for i in range(0, len(draw), 3))
        ids = tok.encode(words)[:n_tokens]
        return tok.decode(ids)

    out = []
    for i in range(num):
        images = []
        if with_images:
            side = cfg.data.image_size
            pixels = torch.randint(0, 256, (side, side, 3), generator=generator, dtype=torch.uint8).numpy()
            images = [Image.fromarray(np.ascontiguousarray(pixels), "RGB")]
        out.append(Sample(id=f"synthetic-{first_id + i}", prompt=text(settings.prompt_len),
                          reference=text(settings.prefix_len) if settings.prefix_len else "", images=images))
    return out


def _fixed_plan(step: int, prompts: List[Any], prefix_len: int, dp_size: int):
    """A plan for the global batch (``dp_size`` ranks of ``prompts``' shape) forcing ``prefix_len`` reference
    tokens on every prompt: the profile's fixed shape, no curriculum."""
    from megatron_rcpa.algo.curriculum import CurriculumPlan

    lengths = [len(p.reference_ids) if p.reference_ids is not None else None for p in prompts] * dp_size
    ks = [min(prefix_len, n_ref or 0) for n_ref in lengths]
    n = len(lengths)
    return CurriculumPlan(step=step, keys=[str(p.key) for p in prompts] * dp_size, lengths=lengths,
                          is_probe=[False] * n,
                          difficulty=[0.0] * n, rho=[0.0] * n, k=ks, rho_t=0.0)


class _TimedOptimizer:
    """Delegates to megatron's optimizer; its ``step()`` is timed as the "optimizer" phase, carved out of
    "train" (which :func:`train_step` calls it inside)."""

    def __init__(self, optimizer, timer: PhaseTimer) -> None:
        self._optimizer = optimizer
        self._timer = timer

    def step(self, *args, **kwargs):
        self._timer.stop("train")
        self._timer.start("optimizer")
        try:
            return self._optimizer.step(*args, **kwargs)
        finally:
            self._timer.stop("optimizer")
            self._timer.start("train")

    def __getattr__(self, name):
        return getattr(self._optimizer, name)


# -------------------------------------------------------------------------------------------- the run
def _reduce(values: List[float], op) -> List[float]:
    dist = torch.distributed
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.cpu().tolist()


def _max_over_ranks(times: Dict[str, float]) -> Dict[str, float]:
    """A step's phase times, max over all ranks (the slowest rank sets the pace)."""
    return dict(zip(PHASES, _reduce([times.get(p, 0.0) for p in PHASES], torch.distributed.ReduceOp.MAX)))


def _sum_over_dp(values: List[int], groups) -> List[int]:
    if groups.dp_size == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    t = torch.tensor(values, dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, group=groups.dp_group)
    return [int(v) for v in t.cpu().tolist()]


def _shapes(policy, hf_config, log) -> Tuple[DecoderShape, Optional[VisionShape]]:
    """The FLOP model's shapes of the policy (the vision tower's where the FLOP model knows it)."""
    text = getattr(hf_config, "text_config", None) or hf_config
    decoder = DecoderShape.from_hf_config(text, vocab_size=policy.padded_vocab_size)
    vision = None
    if getattr(policy, "vision_model", None) is not None:
        try:
            vision = VisionShape.from_hf_config(hf_config)
        except (AttributeError, KeyError, TypeError) as exc:
            log(f"note: the FLOP model has no shape for this vision tower ({type(exc).__name__}: {exc}); "
                "its FLOPs are not counted")
    return decoder, vision


def profile_precision(cfg, run: PrecisionRun, settings: ProfileSettings, device: DeviceInfo,
                      log: Callable[[str], None] = print) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Build the trainer's step context at ``run``'s precision (BF16 params; FP8 through TE or torchao), run warm-up +
    measured steps of the trainer's phases (:mod:`megatron_rcpa.train.phases`) on synthetic prompts and
    rewards, return (run record, config summary). Needs :func:`megatron_session`."""
    from megatron_rcpa.rollout.sampling import StopChecker
    from megatron_rcpa.train import phases
    from megatron_rcpa.train.families import adapter_for, build_tokenizer_and_config
    from megatron_rcpa.train.step import resolve_groups
    from megatron_rcpa.train.trainer import build_step_context

    groups = resolve_groups()
    dp, dp_rank = groups.dp_size, groups.dp_rank
    world = torch.distributed.get_world_size()
    group = cfg.rcpa.group_size
    new_tokens = cfg.rollout.max_new_tokens
    fp8 = run.precision == "fp8"
    cuda = torch.cuda.is_available()
    impl = settings.loss_impl if settings.loss_impl != "auto" else ("triton" if cuda else "torch")
    beta = cfg.rcpa.loss.beta
    if not cfg.model.tiny and not cfg.model.checkpoint:
        raise ProfileConfigError(f"model.family = {cfg.model.family!r} needs model.checkpoint (a converted "
                                 "checkpoint, for its architecture) or model.tiny=true")
    te = fp8 and run.fp8_backend == "te"
    if settings.load_weights and te:
        raise ProfileConfigError("--load-weights applies to bf16 and torchao FP8 only: the TE layer spec names its "
                                 "parameters differently from a converted (local-spec) checkpoint; FP8 throughput "
                                 "through TE uses random weights")
    if settings.load_weights and not cfg.model.checkpoint:
        raise ProfileConfigError("--load-weights needs model.checkpoint")
    from megatron_rcpa.train.config import Fp8Config

    fp8_cfg = Fp8Config(enabled=True, backend=run.fp8_backend, recipe=run.fp8_recipe) if fp8 else Fp8Config()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="bf16", fp8=fp8_cfg),
                              run=dataclasses.replace(cfg.run, kernels=impl))
    try:
        phases.check_batch_layout(cfg, dp)
        tok, hf_config = build_tokenizer_and_config(cfg)
    except ValueError as exc:
        raise ProfileConfigError(str(exc)) from exc
    rows = cfg.data.prompts_per_step // dp * group
    if te and rows % 16:
        raise ProfileConfigError(f"FP8 decode runs {rows} rows per rank (prompts per rank x rcpa.group_size); "
                                 "TE's FP8 GEMMs need a multiple of 16")

    torch.manual_seed(settings.seed)
    family = adapter_for(cfg.model.family, tok, hf_config, checkpoint=cfg.model.checkpoint,
                         system_prompt=cfg.data.system_prompt)
    policy_kwargs: Dict[str, Any] = {"load": settings.load_weights or cfg.model.tiny}
    if te:  # the FP8 format (build_policy brings TE's layer spec and recipe from model.fp8)
        policy_kwargs.update(config_overrides=fp8_config_overrides(run))
    # every rollout decodes exactly max_new_tokens (no EOS): the worst case the engine must provision for
    ctx = build_step_context(cfg, groups, tok, hf_config, family, stop=StopChecker([]), policy_kwargs=policy_kwargs)
    policy = ctx.model.module
    from megatron_rcpa.models.fp8 import fp8_module_names

    fp8_linears = len(fp8_module_names(policy))
    decoder, vision = _shapes(policy, hf_config, log)
    is_vlm = getattr(policy, "vision_model", None) is not None
    lambda_t = cfg.rcpa.loss.lambda_0 if settings.prefix_len else 0.0  # fixed: no curriculum state here
    # the static decode path computes the prefill's last-position logits only
    prefill_logits = "last" if cfg.rollout.decode == "static" and groups.pp_size == 1 else "all"

    timer = PhaseTimer(use_cuda=cuda)
    mismatch = float("nan")
    flops: Dict[str, int] = {}
    counts: Dict[str, int] = {}
    data_gen = torch.Generator().manual_seed(settings.seed * 7919 + dp_rank)
    total_steps = settings.warmup + settings.steps
    local_params = sum(p.numel() for p in policy.parameters())
    n_prompts = cfg.data.prompts_per_step // dp
    prompt_tokens = 0
    timed_optimizer = _TimedOptimizer(ctx.optimizer, timer)

    def random_rewards(traj) -> List[float]:
        return torch.rand(len(traj.rollouts), generator=data_gen).tolist()

    for it in range(total_steps):
        samples = synthetic_samples(tok, cfg, settings, n_prompts, it * cfg.data.prompts_per_step + dp_rank * n_prompts,
                                    data_gen, with_images=is_vlm)
        prompts = [family.format(s) for s in samples]
        prompt_tokens = len(prompts[0].prompt_ids)
        if it == 0:
            log(f"[{run.label}] {cfg.model.family} ({'tiny' if cfg.model.tiny else cfg.model.checkpoint}; weights "
                f"{'loaded' if policy_kwargs['load'] else 'random'}): {local_params:,} parameters on this rank; "
                f"{rows} rollouts/rank of {prompt_tokens} prompt + {new_tokens} new tokens; {settings.warmup} "
                f"warm-up + {settings.steps} steps")
        traj = phases.Trajectory(step=it, prompts=prompts, plan=_fixed_plan(it, prompts, settings.prefix_len, dp),
                                 first_prompt=dp_rank * n_prompts)
        with timer.phase("rollout"):
            traj = phases.rollout(ctx, traj)
            traj = phases.score(ctx, traj, random_rewards)
            traj = phases.advantages(ctx, traj)
        with timer.phase("logprob"):
            traj = phases.logprobs(ctx, traj, lambda_t=lambda_t)
        timer.start("train")
        metrics = phases.update(ctx, traj, optimizer=timed_optimizer)
        timer.stop("train")
        times = timer.end_step(record=it >= settings.warmup, reduce=_max_over_ranks)
        if traj.old_logp is None:  # one update per step: the training forward measured it (train/step.py)
            mismatch = float(metrics.get("logp_mismatch", float("nan")))
        else:  # sanity: the cached decode's log-probs vs the recompute
            mask = torch.cat([m.gen_mask for m in traj.micro])
            diff = (torch.cat([o.float().cpu() for o in traj.old_logp])
                    - torch.cat([m.rollout_logp for m in traj.micro])).abs()
            mismatch = float(diff[mask].mean())
        log(f"[{run.label}] step {it + 1}/{total_steps}{' (warm-up)' if it < settings.warmup else ''}: "
            + ", ".join(f"{p} {times.get(p, 0.0) * 1e3:.1f} ms" for p in PHASES)
            + f"; grad_norm {metrics.get('grad_norm', float('nan')):.3g}, rollout-vs-recompute log-prob "
            f"|diff| {mismatch:.3g}")

        # model FLOPs and tokens of this step
        batch = traj.batch
        lengths = batch.lengths.tolist()
        prompt_lens = [len(r.prompt_tokens) + len(r.prefix_tokens) for r in traj.rollouts]
        gen_lens = [len(r.generated_tokens) for r in traj.rollouts]
        grids = ([tuple(int(v) for v in traj.prompts[r.prompt_id].image_grid_thw[0]) for r in traj.rollouts]
                 if vision is not None else [])
        passes = 2 if ctx.reference is not None else 1
        local = [
            rollout_flops(decoder, prompt_lens, gen_lens, vision=vision, grids=grids, attention=settings.attention,
                          prefill_logits=prefill_logits),
            logprob_flops(decoder, lengths, passes=passes, vision=vision, grids=grids, attention=settings.attention),
            train_flops(decoder, lengths, vision=vision, grids=grids, attention=settings.attention),
            sum(gen_lens), sum(lengths), int(batch.tokens.numel()),
        ]
        flops_and_counts = _sum_over_dp(local, groups)
        flops = dict(zip(("rollout", "logprob", "train"), flops_and_counts[:3]))
        counts = dict(zip(("generated", "sequence", "padded"), flops_and_counts[3:]))

    peaks: List[Optional[int]] = [None] * len(PHASES)
    if cuda:  # this rank's peaks, then the max over ranks
        local_peaks = [float(timer.peak_memory.get(p) or 0) for p in PHASES]
        peaks = [int(v) for v in _reduce(local_peaks, torch.distributed.ReduceOp.MAX)]
    peak_tflops, peak_source = resolve_peak(device, run.precision, gpu=settings.gpu, peak_tflops=settings.peak_tflops)
    tokens = {"rollout": counts["generated"], "logprob": counts["sequence"], "train": counts["sequence"],
              "optimizer": None}
    padded = {"rollout": None, "logprob": counts["padded"], "train": counts["padded"], "optimizer": None}
    records = [phase_record(p, timer.times(p), tokens=tokens[p], flops=flops.get(p), world_size=world,
                            peak_tflops=peak_tflops, peak_memory_bytes=peaks[i], padded_tokens=padded[p])
               for i, p in enumerate(PHASES)]
    record = build_run(label=run.label, precision=run.precision, fp8_recipe=run.fp8_recipe,
                       fp8_backend=run.fp8_backend, fp8_format=run.fp8_format, phases=records,
                       step_tokens=counts["sequence"], step_padded_tokens=counts["padded"], world_size=world,
                       peak_tflops=peak_tflops, peak_source=peak_source, warmup_steps=settings.warmup)
    record["rollout_logprob_mismatch"] = mismatch  # last step, last pipeline stage
    if run.fp8_backend == "torchao":  # linears of this rank whose GEMMs ran in float8
        record["fp8_linears_per_rank"] = fp8_linears
    first_grid = traj.prompts[0].image_grid_thw
    summary = {
        "model": f"{cfg.model.family} ({'tiny' if cfg.model.tiny else cfg.model.checkpoint}; weights "
                 f"{'loaded' if policy_kwargs['load'] else 'random'})",
        "family": cfg.model.family,
        "tiny": cfg.model.tiny,
        "checkpoint": cfg.model.checkpoint,
        "parameters_per_rank": local_params,
        "decoder": decoder.to_dict(),
        "vision": vision.to_dict() if vision is not None else None,
        "tp": groups.tp_size, "pp": groups.pp_size, "dp": dp,
        "prompts_per_step": cfg.data.prompts_per_step, "group_size": group,
        "rollouts_per_step": cfg.data.prompts_per_step * group,
        "prompt_tokens": prompt_tokens, "text_prompt_len": settings.prompt_len, "prefix_len": settings.prefix_len,
        "image_grid": [int(v) for v in first_grid[0]] if first_grid is not None else None,
        "max_new_tokens": new_tokens, "micro_batch_size": cfg.optim.micro_batch_size,
        "beta": beta, "reference_model": ctx.reference is not None, "loss_impl": impl,
        "temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p, "rollout_decode": cfg.rollout.decode,
        "phases": "megatron_rcpa.train.phases: rollout+score+advantages | logprobs | update (train, optimizer)",
    }

    del ctx, policy, traj, timed_optimizer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return record, summary
