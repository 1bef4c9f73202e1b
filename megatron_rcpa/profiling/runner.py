"""Run real RCPA steps on a Megatron-Core policy and time their phases (driven by tools/profile_throughput.py).

One step, as the trainer does it, on this rank's share of the batch (``data.prompts_per_step / DP`` prompts,
``rcpa.group_size`` rollouts each):

1. **rollout** - sample ``rollout.max_new_tokens`` tokens per rollout with a KV cache (prefill, then one decode
   step per token; temperature / top-p from the config), then pack the rollouts and compute group advantages.
2. **logprob** - :func:`megatron_rcpa.train.step.compute_logprobs` of the packed batch: the old policy, and the
   frozen reference (a second model) when ``rcpa.loss.beta > 0``.
3. **train** - :func:`megatron_rcpa.train.step.train_step` forward + backward over the micro-batches
   (``optim.micro_batch_size``) through megatron's schedule and DDP, the fused RCPA loss;
4. **optimizer** - the optimizer step inside it (grad clipping, Adam), timed apart through a thin wrapper.

What is synthetic, because the phase costs do not depend on it: prompts are random token ids of
``prompt_len`` text tokens (plus, for Qwen2.5-VL, one random image of ``data.image_size`` pixels a side per
prompt), every rollout generates exactly ``max_new_tokens`` (no early EOS: the worst case the rollout engine
must provision for), rewards are random, and the weights are random unless ``load_weights`` (bf16 only: a
converted checkpoint holds local-spec names, not TE ones). Reward computation (CPU, text) is not timed.

Distributed: under ``torchrun`` the real process group is used (NCCL on GPUs), with ``parallel.tp`` from the
config (``parallel.pp`` must be 1: rollout generation here runs whole models). A plain ``python`` start is
one process (gloo on a CPU, with :func:`megatron_rcpa.testing.install_cpu_shim`). Per-phase times are the max
over ranks; tokens and FLOPs are summed over data-parallel replicas; per-GPU rates divide by the world size.
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
from megatron_rcpa.profiling.precision import PrecisionRun, fp8_config_overrides, te_layer_spec
from megatron_rcpa.profiling.report import build_run, phase_record
from megatron_rcpa.profiling.timer import PhaseTimer

__all__ = ["PHASES", "ProfileConfigError", "ProfileSettings", "megatron_session", "profile_precision"]

PHASES = ("rollout", "logprob", "train", "optimizer")
TINY_GPT_VOCAB = 250


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

        if pp != 1:
            raise ProfileConfigError(f"parallel.pp = {pp}: the profiler generates rollouts with whole models; use "
                                     "parallel.pp=1 (TP and DP are supported)")
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


# ----------------------------------------------------------------------------------------------- policy
@dataclasses.dataclass
class Policy:
    model: torch.nn.Module  # this rank's stage, unwrapped
    decoder: DecoderShape
    vision: Optional[VisionShape]
    vocab_size: int  # real vocabulary
    description: str
    image_token_id: Optional[int] = None
    vision_start_id: Optional[int] = None
    vision_end_id: Optional[int] = None
    text_vocab: int = 0  # ids [0, text_vocab) are plain text tokens

    @property
    def is_vlm(self) -> bool:
        return self.vision is not None


def build_policy(cfg, run: PrecisionRun, settings: ProfileSettings, max_seq: int) -> Policy:
    """This rank's policy for ``cfg.model`` at ``run``'s precision (BF16 params; FP8 through TE)."""
    spec = te_layer_spec() if run.precision == "fp8" else None
    overrides = fp8_config_overrides(run)
    family = cfg.model.family
    if family == "gpt":
        if not cfg.model.tiny:
            raise ProfileConfigError("model.family = 'gpt' is profiled only with model.tiny=true (there is no GPT "
                                     "checkpoint format); use model.family=qwen2_5_vl for real models")
        from megatron_rcpa.runtime.tiny_gpt import tiny_gpt_model, tiny_transformer_config
        from megatron_rcpa.runtime.weights import padded_vocab_size

        config = tiny_transformer_config(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
                                         **overrides)
        model = tiny_gpt_model(config, vocab_size=TINY_GPT_VOCAB, max_seq=max_seq, layer_spec=spec)
        if spec is None:
            model.to(torch.bfloat16)  # the local spec's torch norms are built in fp32 (TE builds in params_dtype)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        padded = padded_vocab_size(TINY_GPT_VOCAB, config.tensor_model_parallel_size)
        return Policy(model, DecoderShape.from_transformer_config(config, padded), None, TINY_GPT_VOCAB,
                      "gpt (tiny)", text_vocab=TINY_GPT_VOCAB)
    if family == "qwen2_5_vl":
        from megatron_rcpa.models.qwen2_5_vl import build_qwen2_5_vl_policy

        padded = None
        if cfg.model.checkpoint:
            from megatron_rcpa.convert.checkpoint import read_metadata

            meta = read_metadata(cfg.model.checkpoint)
            hf_config, padded, what = meta.hf_config, meta.padded_vocab_size, cfg.model.checkpoint
        elif cfg.model.tiny:
            from megatron_rcpa.models.tiny import tiny_qwen2_5_vl_config

            hf_config, what = tiny_qwen2_5_vl_config(), "tiny"
        else:
            raise ProfileConfigError("model.family = 'qwen2_5_vl' needs model.checkpoint (a converted checkpoint, "
                                     "for its architecture) or model.tiny=true")
        if settings.load_weights and run.precision == "fp8":
            raise ProfileConfigError("--load-weights applies to bf16 only: the TE layer spec of FP8 names its "
                                     "parameters differently from a converted (local-spec) checkpoint; FP8 throughput "
                                     "uses random weights")
        if settings.load_weights and not cfg.model.checkpoint:
            raise ProfileConfigError("--load-weights needs model.checkpoint")
        policy = build_qwen2_5_vl_policy(hf_config, params_dtype="bf16", padded_vocab_size=padded,
                                         perform_initialization=not settings.load_weights,
                                         transformer_layer_spec=spec, config_overrides=overrides)
        if settings.load_weights:
            from megatron_rcpa.convert.checkpoint import load_checkpoint

            load_checkpoint(policy, cfg.model.checkpoint)
        hf = policy.hf_config
        return Policy(policy, DecoderShape.from_hf_config(hf, vocab_size=policy.padded_vocab_size),
                      VisionShape.from_hf_config(hf), policy.vocab_size,
                      f"qwen2_5_vl ({what}; weights {'loaded' if settings.load_weights else 'random'})",
                      image_token_id=int(hf.image_token_id), vision_start_id=int(hf.vision_start_token_id),
                      vision_end_id=int(hf.vision_end_token_id), text_vocab=min(int(hf.image_token_id),
                                                                                int(hf.vision_start_token_id)))
    raise ProfileConfigError(f"model.family = {family!r} is not supported by the profiler (gpt with "
                             "model.tiny=true, qwen2_5_vl)")


# ----------------------------------------------------------------------------------------------- prompts
@dataclasses.dataclass
class Prompts:
    ids: torch.Tensor  # [P, p] int64, this rank's prompts
    pixel_values: List[Optional[torch.Tensor]]  # per prompt: [patches, C*T*P*P] or None
    grids: List[Optional[Tuple[int, int, int]]]
    prompt_ids: List[int]  # global prompt (group) ids


def make_prompts(policy: Policy, cfg, settings: ProfileSettings, num: int, first_id: int,
                 generator: torch.Generator) -> Prompts:
    text = torch.randint(1, max(2, policy.text_vocab), (num, settings.prompt_len), generator=generator)
    if not policy.is_vlm:
        return Prompts(text, [None] * num, [None] * num, list(range(first_id, first_id + num)))
    v = policy.vision
    side = max(1, cfg.data.image_size // v.patch_size)
    side -= side % v.spatial_merge_size
    side = max(side, v.spatial_merge_size)
    grid = (1, side, side)
    n_img = side * side // v.spatial_merge_size ** 2
    patch = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    image = torch.tensor([policy.vision_start_id] + [policy.image_token_id] * n_img + [policy.vision_end_id])
    split = settings.prompt_len // 2
    rows = [torch.cat([t[:split], image, t[split:]]) for t in text]  # text, image, text (prefix stays text)
    pixels = [torch.randn(side * side, patch, generator=generator) for _ in range(num)]
    return Prompts(torch.stack(rows), pixels, [grid] * num, list(range(first_id, first_id + num)))


# ---------------------------------------------------------------------------------------------- rollout
def _decode_call(policy: Policy, ids: torch.Tensor, cache, pixel_values=None, grids=None) -> torch.Tensor:
    """One cached forward: prefill (empty cache) or a decode step. Returns gathered logits [B, s, V_padded]."""
    if policy.is_vlm:
        return policy.model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grids, kv_cache=cache)
    b, s = ids.shape
    start = cache.seq_len
    position_ids = torch.arange(start, start + s, device=ids.device).expand(b, s)
    logits = policy.model(ids, position_ids, None, inference_context=cache.context, runtime_gather_output=True)
    cache.context.sequence_len_offset += s
    return logits


@torch.no_grad()
def generate(policy: Policy, prompts: torch.Tensor, max_new_tokens: int, *, temperature: float, top_p: float,
             generator: torch.Generator, pixel_values=None, grids=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample ``max_new_tokens`` per row with a KV cache: (tokens [B, n], sampled log-probs [B, n])."""
    from megatron_rcpa.models.inference import KVCache
    from megatron_rcpa.rollout.sampling import sample_next_tokens

    was_training = policy.model.training
    policy.model.eval()
    try:
        batch, length = prompts.shape
        cache = KVCache(batch, length + max_new_tokens)
        logits = _decode_call(policy, prompts, cache, pixel_values, grids)
        tokens, logps = [], []
        for step in range(max_new_tokens):
            # sampled among text tokens only: a random policy would otherwise emit image/video placeholders,
            # which the VLM forward rejects without pixels
            tok, logp = sample_next_tokens(logits[:, -1, :].float(), temperature=temperature, top_p=top_p,
                                           generator=generator, vocab_size=policy.text_vocab)
            tokens.append(tok)
            logps.append(logp)
            if step + 1 < max_new_tokens:
                logits = _decode_call(policy, tok[:, None], cache)
        return torch.stack(tokens, 1), torch.stack(logps, 1)
    finally:
        policy.model.train(was_training)


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


def _image_forward_fn(policy: Policy, row_pixels: List[torch.Tensor], row_grids: List[Tuple[int, int, int]],
                      device) -> Callable:
    """``forward_fn`` for the step functions: the Qwen2.5-VL policy with the images of the micro-batch's rows
    (looked up by ``seq_ids``, the row index in the packed batch)."""

    def forward(model, mb: Dict[str, torch.Tensor]):
        rows = mb["seq_ids"][:, 0].tolist()
        pixels = torch.cat([row_pixels[r] for r in rows]).to(device)
        grids = torch.tensor([row_grids[r] for r in rows], device=device)
        return model(input_ids=mb["tokens"], pixel_values=pixels, image_grid_thw=grids)

    return forward


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


def _sum_over_dp(values: List[int]) -> List[int]:
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_world_size() == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    t = torch.tensor(values, dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, group=ps.get_data_parallel_group())
    return [int(v) for v in t.cpu().tolist()]


def profile_precision(cfg, run: PrecisionRun, settings: ProfileSettings, device: DeviceInfo,
                      log: Callable[[str], None] = print) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Build the policy at ``run``'s precision, run warm-up + measured steps, return (run record, config
    summary). Needs :func:`megatron_session`."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_rcpa.algo.advantages import compute_advantages
    from megatron_rcpa.rollout.batch import Rollout, pack_rollouts
    from megatron_rcpa.train.step import StepConfig, compute_logprobs, split_micro_batches, train_step

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    world = torch.distributed.get_world_size()
    group = cfg.rcpa.group_size
    if cfg.data.prompts_per_step % dp:
        raise ProfileConfigError(f"data.prompts_per_step = {cfg.data.prompts_per_step} must be a multiple of the "
                                 f"data parallel size {dp}")
    num_prompts = cfg.data.prompts_per_step // dp
    new_tokens = cfg.rollout.max_new_tokens
    fp8 = run.precision == "fp8"
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    impl = settings.loss_impl if settings.loss_impl != "auto" else ("triton" if cuda else "torch")
    beta = cfg.rcpa.loss.beta

    rows = num_prompts * group
    mbs = cfg.optim.micro_batch_size
    if mbs % group:
        raise ProfileConfigError(f"optim.micro_batch_size = {mbs} must be a multiple of rcpa.group_size = {group}: "
                                 "a prompt's rollouts stay in one micro-batch")
    if rows % mbs:
        raise ProfileConfigError(f"{rows} rollouts per rank (data.prompts_per_step / DP x rcpa.group_size) do not "
                                 f"split into micro-batches of optim.micro_batch_size = {mbs}")
    if fp8 and rows % 16:
        raise ProfileConfigError(f"FP8 decode runs {rows} rows per rank (prompts per rank x rcpa.group_size); "
                                 "TE's FP8 GEMMs need a multiple of 16")

    torch.manual_seed(settings.seed)
    probe_gen = torch.Generator().manual_seed(settings.seed)
    policy = build_policy(cfg, run, settings, max_seq=settings.prompt_len + new_tokens + 4096)
    probe = make_prompts(policy, cfg, settings, 1, 0, probe_gen)
    prompt_tokens = int(probe.ids.shape[1])
    model_config = policy.model.config
    reference = None
    if beta > 0:  # the frozen reference policy, as the trainer keeps it
        reference = build_policy(cfg, run, settings, max_seq=settings.prompt_len + new_tokens + 4096)
        reference.model.eval()
        for p in reference.model.parameters():
            p.requires_grad_(False)

    ddp = DistributedDataParallel(model_config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.parallel.distributed_optimizer), policy.model)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, adam_beta1=cfg.optim.adam_beta1,
        adam_beta2=cfg.optim.adam_beta2, clip_grad=cfg.optim.clip_grad, bf16=True, params_dtype=torch.bfloat16,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer), [ddp])
    model_config.finalize_model_grads_func = finalize_model_grads
    step_cfg = StepConfig(loss=cfg.rcpa.loss, lambda_t=cfg.rcpa.loss.lambda_0 if settings.prefix_len else 0.0,
                          temperature=cfg.rollout.temperature, vocab_size=policy.vocab_size, impl=impl)

    timer = PhaseTimer(use_cuda=cuda)
    mismatch = float("nan")
    flops = {}
    counts = {}
    data_gen = torch.Generator().manual_seed(settings.seed * 7919 + dp_rank)
    sample_gen = torch.Generator(device=dev).manual_seed(settings.seed * 104729 + dp_rank)  # same on TP ranks
    total_steps = settings.warmup + settings.steps
    local_params = sum(p.numel() for p in policy.model.parameters())
    log(f"[{run.label}] {policy.description}: {local_params:,} parameters on this rank; {rows} rollouts/rank of "
        f"{prompt_tokens} prompt + {new_tokens} new tokens; {settings.warmup} warm-up + {settings.steps} steps")

    for it in range(total_steps):
        step_id = it * cfg.data.prompts_per_step + dp_rank * num_prompts
        prompts = make_prompts(policy, cfg, settings, num_prompts, step_id, data_gen)
        row_prompt = [i for i in range(num_prompts) for _ in range(group)]
        ids = prompts.ids[row_prompt].to(dev)
        pixels = grids = None
        if policy.is_vlm:
            pixels = torch.cat([prompts.pixel_values[i] for i in row_prompt]).to(dev)
            grids = torch.tensor([prompts.grids[i] for i in row_prompt], device=dev)

        with timer.phase("rollout"):
            gen, gen_logp = generate(policy, ids, new_tokens, temperature=cfg.rollout.temperature,
                                     top_p=cfg.rollout.top_p, generator=sample_gen, pixel_values=pixels, grids=grids)
            gen, gen_logp = gen.cpu(), gen_logp.float().cpu()
            rewards = torch.rand(rows, generator=data_gen)
            adv = compute_advantages(rewards, torch.tensor([prompts.prompt_ids[i] for i in row_prompt]),
                                     estimator=cfg.rcpa.advantage.estimator, eps=cfg.rcpa.advantage.eps,
                                     batch_std=cfg.rcpa.advantage.batch_std).advantages
            k = settings.prefix_len
            rollouts = []
            for r, i in enumerate(row_prompt):
                prompt = prompts.ids[i].tolist()
                split = len(prompt) - k
                rollouts.append(Rollout(prompts.prompt_ids[i], prompt[:split], prompt[split:], gen[r].tolist(),
                                        gen_logp[r].tolist()))
            batch = pack_rollouts(rollouts, adv.tolist(), pad_id=0, pad_to_multiple=16 if fp8 else 8)
            micro = split_micro_batches(batch, cfg.optim.micro_batch_size, group)
        forward_fn = (_image_forward_fn(policy, [prompts.pixel_values[i] for i in row_prompt],
                                        [prompts.grids[i] for i in row_prompt], dev)
                      if policy.is_vlm else None)
        kw = {"forward_fn": forward_fn} if forward_fn is not None else {}

        with timer.phase("logprob"):
            old = compute_logprobs(ddp, micro, step_cfg, **kw)
            ref = compute_logprobs(reference.model, micro, step_cfg, **kw) if reference is not None else None
        timer.start("train")
        metrics = train_step(ddp, _TimedOptimizer(optimizer, timer), micro, old, step_cfg, ref_logp=ref, **kw)
        timer.stop("train")
        times = timer.end_step(record=it >= settings.warmup, reduce=_max_over_ranks)
        if old is not None:  # sanity: the cached decode's log-probs vs the recompute (equal up to bf16 rounding)
            mask = torch.cat([m.gen_mask for m in micro])
            diff = (torch.cat([o.float().cpu() for o in old]) - torch.cat([m.rollout_logp for m in micro])).abs()
            mismatch = float(diff[mask].mean())
        log(f"[{run.label}] step {it + 1}/{total_steps}{' (warm-up)' if it < settings.warmup else ''}: "
            + ", ".join(f"{p} {times.get(p, 0.0) * 1e3:.1f} ms" for p in PHASES)
            + f"; grad_norm {metrics.get('grad_norm', float('nan')):.3g}, rollout-vs-recompute log-prob "
            f"|diff| {mismatch:.3g}")

        # model FLOPs and tokens of this step (identical every step: fixed lengths)
        lengths = batch.lengths.tolist()
        images = [prompts.grids[i] for i in row_prompt] if policy.is_vlm else []
        vis = policy.vision
        passes = 2 if reference is not None else 1
        local = [
            rollout_flops(policy.decoder, [prompt_tokens] * rows, [new_tokens] * rows, vision=vis, grids=images,
                          attention=settings.attention),
            logprob_flops(policy.decoder, lengths, passes=passes, vision=vis, grids=images,
                          attention=settings.attention),
            train_flops(policy.decoder, lengths, vision=vis, grids=images, attention=settings.attention),
            rows * new_tokens, sum(lengths), int(batch.tokens.numel()),
        ]
        flops_and_counts = _sum_over_dp(local)
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
    record = build_run(label=run.label, precision=run.precision, fp8_recipe=run.fp8_recipe, phases=records,
                       step_tokens=counts["sequence"], step_padded_tokens=counts["padded"], world_size=world,
                       peak_tflops=peak_tflops, peak_source=peak_source, warmup_steps=settings.warmup)
    record["rollout_logprob_mismatch"] = mismatch  # last step, last pipeline stage; see generate()
    summary = {
        "model": policy.description,
        "family": cfg.model.family,
        "tiny": cfg.model.tiny,
        "checkpoint": cfg.model.checkpoint,
        "parameters_per_rank": local_params,
        "decoder": policy.decoder.to_dict(),
        "vision": policy.vision.to_dict() if policy.vision is not None else None,
        "tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": dp,
        "prompts_per_step": cfg.data.prompts_per_step, "group_size": group,
        "rollouts_per_step": cfg.data.prompts_per_step * group,
        "prompt_tokens": prompt_tokens, "text_prompt_len": settings.prompt_len, "prefix_len": settings.prefix_len,
        "image_grid": list(probe.grids[0]) if policy.is_vlm else None,
        "max_new_tokens": new_tokens, "micro_batch_size": cfg.optim.micro_batch_size,
        "beta": beta, "reference_model": reference is not None, "loss_impl": impl,
        "temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p,
    }

    del ddp, optimizer, policy, reference
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return record, summary
