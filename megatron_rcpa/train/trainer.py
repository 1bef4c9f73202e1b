"""The RCPA training loop, top to bottom (RCPA_SPEC sections 2-5).

Every step, on every rank (TP x PP x DP), the phases of :mod:`megatron_rcpa.train.phases`:

1. data        this data-parallel rank's share of the global batch (``data.prompts_per_step`` prompts)
2. plan        the curriculum picks probes and forced prefix lengths k_i for the whole global batch
3. rollout     prompt ⊕ y*_{1..k_i} -> G sampled continuations on the training policy (KV cache)
4. score       the reward function judges prefix ⊕ continuation; rewards are gathered over DP
5. advantages  group advantages per prompt over the global batch (fused kernel on GPU)
6. logprobs    old-policy (and reference, when beta > 0) log-probs recomputed through the schedule
7. update      the RCPA loss through megatron's schedule, DDP, optimizer, LR schedule (train/step.py)
8. then        the curriculum folds in the global rewards; metrics are logged; checkpoint at intervals

All randomness is derived from (seed, step, rank): a resumed run takes the identical next step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Dict, List, Optional

import torch

from megatron_rcpa.algo.curriculum import PRE_ALIGNMENT, Curriculum
from megatron_rcpa.rollout.engine import RolloutEngine, SamplingParams
from megatron_rcpa.rollout.sampling import StopChecker
from megatron_rcpa.train import checkpointing as ckpt
from megatron_rcpa.train import phases
from megatron_rcpa.train.config import TrainConfig
from megatron_rcpa.train.families import adapter_for, build_tokenizer_and_config, char_tokenizer_metadata
from megatron_rcpa.train.guard import NonFiniteGuard, NonFiniteUpdateError
from megatron_rcpa.train.metrics_log import MetricsLogger
from megatron_rcpa.train.phases import StepContext, Trajectory, check_batch_layout, lr_at
from megatron_rcpa.train.stop import STOP_LINE, StopRequests

STATE_FILE = ckpt.STATE_FILE
LATEST_FILE = ckpt.LATEST_FILE


# ---------------------------------------------------------------------------------------------- set-up
def init_parallel(cfg: TrainConfig):
    """torch.distributed (torchrun env, or a single process) + megatron parallel state + seeds, and on a CPU-only
    torch the device shim and ``run.cpu_threads``: :func:`megatron_rcpa.runtime.parallel.init_distributed`.
    Returns this rank's :class:`~megatron_rcpa.runtime.parallel.ParallelGroups`.

    A layout the caller has already set up (a launcher's workers, as the tests use) is kept as it is, whatever
    ``parallel.tp``/``parallel.pp`` say; under ``torchrun`` or a plain start the config's layout is built."""
    from megatron_rcpa.runtime.parallel import ParallelGroups, init_distributed

    current = ParallelGroups.current()
    tp, pp = (current.tp_size, current.pp_size) if current is not None else (cfg.parallel.tp, cfg.parallel.pp)
    return init_distributed(tp, pp, cfg.run.seed, cpu_threads=cfg.run.cpu_threads)


def build_policy(cfg: TrainConfig, hf_config, *, seed_offset: int = 0, load: bool = True, **build_kwargs: Any):
    """This rank's policy stage: the checkpoint's weights (``load=False``: its architecture with megatron's
    random init), or (``model.tiny``) weights the family draws per tensor from its global name, the same at
    every TP/PP layout. ``build_kwargs`` go to the family's builder (e.g. the profiler's ``config_overrides``).
    ``model.fp8`` (:mod:`megatron_rcpa.models.fp8`): Transformer Engine's layer spec, or the decoder's linears'
    GEMMs through torchao float8 (same parameters and names as BF16)."""
    from megatron_rcpa.models import families
    from megatron_rcpa.models.attention import policy_attention_kwargs
    from megatron_rcpa.models.fp8 import resolve_fp8
    from megatron_rcpa.models.parallel_knobs import transformer_overrides

    fp8_backend, fp8_recipe = resolve_fp8(cfg.model.fp8)
    if fp8_backend == "te":  # Transformer Engine's layer spec and FP8 options (the caller's win)
        from megatron_rcpa.models.fp8 import Fp8Error, te_config_overrides, te_layer_spec

        if load and not cfg.model.tiny:
            raise Fp8Error(f"model.fp8.backend = 'te' cannot load model.checkpoint = {cfg.model.checkpoint!r}: "
                           "Transformer Engine's layer spec names its parameters differently from a converted "
                           "(local-spec) checkpoint; use model.fp8.backend=torchao")
        build_kwargs.setdefault("transformer_layer_spec", te_layer_spec())
        build_kwargs["config_overrides"] = {**te_config_overrides(fp8_recipe),
                                            **(build_kwargs.get("config_overrides") or {})}
    if "transformer_layer_spec" not in build_kwargs:  # (an FP8 run through TE brings TE's spec)
        build_kwargs = {**policy_attention_kwargs(cfg.model.family, cfg.model.attention), **build_kwargs}
    from megatron_rcpa.train.hf_checkpoint import resolve_dtype

    dtype = torch.bfloat16 if resolve_dtype(cfg.model) == "bf16" else torch.float32
    # the memory knobs (recompute, sequence parallel, uneven stages); a caller's config_overrides win
    build_kwargs["config_overrides"] = {**transformer_overrides(cfg), **(build_kwargs.get("config_overrides") or {})}
    if cfg.model.tiny:
        family = families.get(cfg.model.family)
        policy = family.build_policy(hf_config, params_dtype=dtype, **build_kwargs)
        family.init_tiny_weights(policy, cfg.run.seed + seed_offset)
    else:
        from megatron_rcpa.convert.checkpoint import build_policy_from_checkpoint

        policy, _ = build_policy_from_checkpoint(cfg.model.checkpoint, load=load, params_dtype=dtype, **build_kwargs)
    if fp8_backend == "torchao":  # the decoder's linears run their GEMMs in float8; the weights are unchanged
        from megatron_rcpa.models.fp8 import enable_torchao_fp8

        enable_torchao_fp8(policy, fp8_recipe)
    return policy



def enable_vision_recompute(policy: torch.nn.Module, cfg: TrainConfig) -> None:
    """``model.vision_recompute``: the HF vision tower recomputes its blocks in backward instead of keeping their
    activations (transformers' gradient checkpointing, non-reentrant). A megatron ViT (LLaVA) recomputes with
    the ``model.recompute_*`` settings instead."""
    from megatron_rcpa.models import families

    tower = getattr(policy, "vision_model", None)
    if tower is None:  # a later pipeline stage, or a text model
        if not families.get(cfg.model.family).param_groups:
            raise ValueError(f"model.vision_recompute = true but model.family = {cfg.model.family!r} has no vision "
                             "tower")
        return
    if not hasattr(tower, "gradient_checkpointing_enable"):
        raise ValueError(f"model.vision_recompute = true: the {cfg.model.family!r} vision tower is megatron's ViT; "
                         "use model.recompute_granularity / recompute_method / recompute_num_layers for it")
    tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def freeze_groups(policy: torch.nn.Module, cfg: TrainConfig) -> int:
    """``model.freeze_vision`` / ``model.freeze_projector``: stop the gradients of the family's vision tower /
    projector parameters on this rank (before DDP and the optimizer are built, so they get no buffers and no
    optimizer state). Returns the number of frozen parameters here (0 on stages without them)."""
    from megatron_rcpa.models import families

    wanted = {g for g, on in (("vision", cfg.model.freeze_vision), ("projector", cfg.model.freeze_projector)) if on}
    if not wanted:
        return 0
    family = families.get(cfg.model.family)
    known = {g for g, _ in family.param_groups}
    missing = sorted(wanted - known)
    if missing:
        raise ValueError(f"model.freeze_{missing[0]} = true but model.family = {cfg.model.family!r} has no "
                         f"{missing[0]} parameters (freezable groups: {sorted(known) or 'none'})")
    n = 0
    for name, p in policy.named_parameters():
        if family.param_group(name) in wanted:
            p.requires_grad_(False)
            n += 1
    return n


def reference_sets(dataset) -> List[List[str]]:
    """Every sample's references (all of them where a row gives several), without decoding images."""
    if hasattr(dataset, "reference_sets"):
        return dataset.reference_sets()
    out = []
    for s in dataset:
        refs = s.meta.get("all_references") or ([s.reference] if s.reference else [])
        out.append([str(r) for r in refs])
    return out


def build_val_samples(cfg: TrainConfig) -> List[Any]:
    """The held-out samples of ``data.val_path`` (the first ``data.val_max_samples``); for a synthetic run
    ``data.val_synthetic_size`` samples drawn with another seed; else []."""
    if not cfg.data.val_path:
        if cfg.data.path is None and cfg.data.val_synthetic_size:
            from megatron_rcpa.data.synthetic import make_synthetic_dataset

            return list(make_synthetic_dataset(cfg.data.synthetic, cfg.data.val_synthetic_size,
                                               seed=cfg.run.seed + 1_000_003, image_size=cfg.data.image_size,
                                               reference_style=cfg.data.synthetic_reference))
        return []
    from megatron_rcpa.data.readers import load_samples

    ds = load_samples(cfg.data.val_path, config=cfg.data.reader_config())
    if len(ds) == 0:
        raise ValueError(f"data.val_path = {cfg.data.val_path!r}: no usable rows ({ds.stats.summary()})")
    n = len(ds) if not cfg.data.val_max_samples else min(len(ds), cfg.data.val_max_samples)
    return [ds[i] for i in range(n)]


def build_dataset(cfg: TrainConfig):
    if cfg.data.path is None:
        from megatron_rcpa.data.synthetic import make_synthetic_dataset

        return make_synthetic_dataset(cfg.data.synthetic, cfg.data.synthetic_size, seed=cfg.run.seed,
                                      image_size=cfg.data.image_size, reference_style=cfg.data.synthetic_reference)
    from megatron_rcpa.data.readers import load_samples

    ds = load_samples(cfg.data.path, config=cfg.data.reader_config())
    if ds.stats.total_skipped:
        print(f"[data] {ds.stats.summary()}", flush=True)
    if len(ds) == 0:
        raise ValueError(f"data.path = {cfg.data.path!r}: no usable rows ({ds.stats.summary()})")
    return ds


# ---------------------------------------------------------------------------------------------- trainer
def build_step_context(cfg: TrainConfig, groups, tok, hf_config, family, *, stop: Optional[StopChecker] = None,
                       policy_kwargs: Optional[Dict[str, Any]] = None) -> StepContext:
    """The pieces one RL step needs, built once from the config: the policy (DDP-wrapped), megatron's
    optimizer, the frozen reference (beta > 0), the rollout engine and the curriculum. The trainer and the
    profiler both build through here. ``stop`` overrides the engine's stop rule (the profiler decodes a fixed
    number of tokens); ``policy_kwargs`` go to the family's policy builder (e.g. the profiler's TE FP8 format as
    ``config_overrides``); ``model.fp8`` is applied by :func:`build_policy`, to the reference model too."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_rcpa.models.policy_base import trainer_forward  # one forward for every family

    check_batch_layout(cfg, groups.dp_size)
    if cfg.model.dtype == "auto":  # (the Trainer resolves it first; a direct caller gets the same rule)
        from megatron_rcpa.train.hf_checkpoint import resolve_dtype

        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=resolve_dtype(cfg.model)))
    policy = build_policy(cfg, hf_config, **(policy_kwargs or {}))
    freeze_groups(policy, cfg)
    if cfg.model.vision_recompute:
        enable_vision_recompute(policy, cfg)
    model = DistributedDataParallel(policy.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.parallel.distributed_optimizer), policy)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=cfg.optim.lr, min_lr=cfg.optim.min_lr, weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.adam_beta1, adam_beta2=cfg.optim.adam_beta2, clip_grad=cfg.optim.clip_grad,
        bf16=cfg.model.dtype == "bf16", params_dtype=policy.config.params_dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer), [model])
    optimizer = NonFiniteGuard(optimizer)  # a non-finite grad norm skips the update (train/guard.py)
    policy.config.finalize_model_grads_func = finalize_model_grads
    reference = None
    if cfg.rcpa.loss.beta > 0:  # frozen reference: model.reference_checkpoint, else the initial policy
        reference = build_policy(cfg, hf_config, **(policy_kwargs or {}))
        if cfg.model.reference_checkpoint:
            from megatron_rcpa.convert.checkpoint import load_checkpoint

            load_checkpoint(reference, cfg.model.reference_checkpoint)
        else:
            reference.load_state_dict(policy.state_dict())
        reference.eval().requires_grad_(False)
    if stop is None:
        stop = StopChecker([tok.eos_token_id], cfg.rollout.stop, tok.decode)
    engine = RolloutEngine(policy, vocab_size=policy.vocab_size, pad_id=tok.pad_token_id, stop=stop,
                           params=SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p,
                                                 cfg.rollout.max_new_tokens), seed=cfg.run.seed,
                           banned_token_ids=family.structural_ids(), groups=groups, decode=cfg.rollout.decode,
                           max_rows=cfg.rollout.max_rows, stop_check_every=cfg.rollout.stop_check_every,
                           kv_cache_gb=cfg.rollout.kv_cache_gb, compact=cfg.rollout.compact,
                           pp_microbatches=cfg.rollout.pp_microbatches)
    kernels = cfg.run.kernels
    impl = ("triton" if torch.cuda.is_available() else "torch") if kernels == "auto" else kernels
    return StepContext(cfg=cfg, groups=groups, model=model, optimizer=optimizer, engine=engine,
                       curriculum=Curriculum(cfg.rcpa.curriculum), forward_fn=trainer_forward,
                       micro_batch_inputs=family.micro_batch_inputs, vocab_size=policy.vocab_size,
                       pad_id=tok.pad_token_id, impl=impl, reference=reference)


class Trainer:
    """Builds the step context, the data and the logger; runs the phases of :mod:`megatron_rcpa.train.phases`
    step after step; saves and resumes."""

    def __init__(self, cfg: TrainConfig) -> None:
        from megatron_rcpa.data.sampler import PromptSampler
        from megatron_rcpa.rewards import get_reward
        from megatron_rcpa.train.hf_checkpoint import prepare_checkpoints
        from megatron_rcpa.train.step import resolve_groups

        # an HF model.checkpoint: converted once by global rank 0 into output_dir/converted/ (before megatron's
        # parallel state exists); model.dtype = auto resolved to the checkpoint's dtype
        cfg = prepare_checkpoints(cfg)
        self.cfg = cfg
        init_parallel(cfg)
        self.groups = resolve_groups()
        self.rank = torch.distributed.get_rank()
        self.dp_rank, self.dp_size = self.groups.dp_rank, self.groups.dp_size
        self.is_logger = self.rank == torch.distributed.get_world_size() - 1  # a last-stage rank holds metrics
        check_batch_layout(cfg, self.dp_size)
        self.tok, self.hf_config = build_tokenizer_and_config(cfg)
        self.family = adapter_for(cfg.model.family, self.tok, self.hf_config, checkpoint=cfg.model.checkpoint,
                                  system_prompt=cfg.data.system_prompt)
        self.ctx = build_step_context(cfg, self.groups, self.tok, self.hf_config, self.family)
        self.model, self.optimizer, self.reference = self.ctx.model, self.ctx.optimizer, self.ctx.reference
        self.engine, self.curriculum = self.ctx.engine, self.ctx.curriculum
        self.vocab_size = self.ctx.vocab_size
        self.model_config = self.model.module.config
        self.dataset = build_dataset(cfg)
        # the global batch is data.prompts_per_step prompts; this rank loads only its share of them
        self.sampler = PromptSampler(self.dataset, cfg.data.prompts_per_step // self.dp_size, seed=cfg.run.seed,
                                     shuffle=cfg.data.shuffle, dp_rank=self.dp_rank, dp_size=self.dp_size,
                                     accept=self._accept_prompt())
        self.reward = get_reward(cfg.reward.name, api=cfg.reward.api, **cfg.reward.kwargs)
        fit = getattr(self.reward.fn, "fit_references", None)
        if callable(fit):  # e.g. CIDEr-D's document frequencies: once, on the training references (any layout)
            fit(reference_sets(self.dataset))
        self.impl = self.ctx.impl
        self.val_samples = build_val_samples(cfg)
        self.step = 0
        self.logger = MetricsLogger(cfg, enabled=self.is_logger)

    def _accept_prompt(self):
        """The sampler's check of a drawn sample's prompt length (``data.long_prompts``: skip, or keep it when a
        truncated text fits)."""
        from megatron_rcpa.data.sampler import PromptSampler, prompt_truncator

        cfg = self.cfg.data
        if cfg.long_prompts == "truncate":
            self._truncate = prompt_truncator(self.family.format, cfg.max_prompt_tokens)
            return lambda sample: None if self._truncate(sample) is not None else "prompt_too_long"
        self._truncate = None
        return PromptSampler.length_check(self.family.format, cfg.max_prompt_tokens)

    def reward_fn(self, traj: Trajectory) -> List[float]:
        """The configured reward of this rank's rollouts: decoded responses, the prompts' references and each
        rollout's sample fields (:mod:`megatron_rcpa.rewards.adapters` lists them)."""
        from megatron_rcpa.rewards.fields import sample_fields

        responses = [self.tok.decode(r.response_tokens) for r in traj.rollouts]
        refs = [traj.prompts[r.prompt_id].reference for r in traj.rollouts]
        fields = sample_fields([traj.samples[r.prompt_id] for r in traj.rollouts]) if traj.samples else {}
        return self.reward(responses, refs, **fields)

    # -------------------------------------------------------------------------------------- checkpoint
    def checkpoint_dir(self, step: int) -> str:
        return ckpt.checkpoint_dir(self.cfg.run.output_dir, step)

    def save(self) -> str:
        """Policy (convertible to HF), optimizer, curriculum and data cursor; written aside, fsynced, then
        renamed into place (train/checkpointing.py). Refuses to write non-finite weights."""
        from megatron_rcpa.convert.checkpoint import (
            ASSETS_DIR,
            CheckpointMetadata,
            read_metadata,
            save_checkpoint,
            save_sharded,
        )

        out = self.cfg.run.output_dir
        final = self.checkpoint_dir(self.step)
        tmp = final + ckpt.INCOMPLETE_SUFFIX
        self._check_finite_weights()
        if self.rank == 0:
            os.makedirs(ckpt.checkpoints_root(out), exist_ok=True)
            for path in ckpt.remove_leftovers(out):
                self.logger.info(f"removed {path} (left by an interrupted save)")
        torch.distributed.barrier()
        policy = self.model.module
        meta = CheckpointMetadata(family=self.cfg.model.family, hf_config=self.hf_config.to_dict(),
                                  dtype=self.cfg.model.dtype, vocab_size=self.vocab_size,
                                  padded_vocab_size=policy.padded_vocab_size,
                                  extra={"step": self.step, **char_tokenizer_metadata(self.tok)})
        if self.cfg.model.checkpoint:  # keep what the export needs of the HF original (config.json, dtypes)
            source = read_metadata(self.cfg.model.checkpoint)
            meta = dataclasses.replace(meta, hf_config=source.hf_config, source_dtype=source.source_dtype,
                                       hf_tensor_dtypes=dict(source.hf_tensor_dtypes),
                                       extra={**source.extra, "step": self.step,
                                              "started_from": os.path.abspath(self.cfg.model.checkpoint)})
        assets = os.path.join(self.cfg.model.checkpoint, ASSETS_DIR) if self.cfg.model.checkpoint else None
        # the tokenizer / processor files travel with every checkpoint, so that it converts to a usable HF dir
        save_checkpoint(policy, os.path.join(tmp, "policy"), meta,
                        assets_from=assets if assets and os.path.isdir(assets) else None)
        if self.rank == 0:
            os.makedirs(os.path.join(tmp, "optimizer"), exist_ok=True)
        torch.distributed.barrier()
        opt_sd = ckpt.optimizer_sharded_state_dict(self.optimizer, policy.sharded_state_dict())
        save_sharded(opt_sd, os.path.join(tmp, "optimizer"))
        ckpt.fsync_tree(tmp)  # every rank: the files it wrote reach the disk before the rename
        torch.distributed.barrier()
        if self.rank == 0:
            state = {"step": self.step, "curriculum": self.curriculum.state_dict(),
                     "sampler": self.sampler.state_dict(), "skipped_updates": self.optimizer.skipped_total,
                     "layout": self._layout(), "config": self.cfg.to_dict()}
            ckpt.write_file_durably(os.path.join(tmp, ckpt.STATE_FILE), json.dumps(state))
            ckpt.publish(tmp, final, out)
            for path in ckpt.prune(out, self.cfg.run.keep_last, protect=final):
                self.logger.info(f"removed {path} (run.keep_last={self.cfg.run.keep_last})")
        torch.distributed.barrier()
        return final

    def _layout(self) -> Dict[str, Any]:
        p = self.cfg.parallel
        return {"tp": p.tp, "pp": p.pp, "dp": self.dp_size, "distributed_optimizer": p.distributed_optimizer,
                "optimizer_format": ckpt.DISTRIB_OPTIM_FORMAT if p.distributed_optimizer else "plain"}

    def _check_finite_weights(self) -> None:
        """Every rank checks its shard; all agree (MAX over the world) before anything is written."""
        bad = [n for n, p in self.model.module.named_parameters() if not bool(torch.isfinite(p).all())]
        flag = torch.tensor([float(bool(bad))], device=next(self.model.parameters()).device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0:
            where = f"rank {self.rank}: {', '.join(bad[:3])}" if bad else "another rank"
            raise NonFiniteUpdateError(f"refusing to save step {self.step}: the weights hold NaN/inf ({where}); "
                                       "the newest complete checkpoint is left as it was")

    def resume_dir(self) -> Optional[str]:
        """``run.resume``: never -> None; a directory -> it; auto -> the newest complete checkpoint under
        output_dir/checkpoints (not only what ``latest`` says), or None when there is none."""
        r = self.cfg.run.resume
        if r == "never":
            return None
        if r != "auto":
            return r
        found, note = ckpt.find_resume_checkpoint(self.cfg.run.output_dir)
        if note:
            self.logger.info(note)
        return found

    def load(self, directory: str) -> None:
        from megatron.core import dist_checkpointing

        from megatron_rcpa.convert.checkpoint import load_checkpoint

        state = ckpt.read_state(directory)
        if state is None or not ckpt.is_complete(directory):
            raise FileNotFoundError(f"{directory!r} is not a complete trainer checkpoint (expected policy/, "
                                    f"optimizer/ and a readable {ckpt.STATE_FILE})")
        saved, now = state.get("layout"), self._layout()
        if saved is not None:
            if saved["distributed_optimizer"] != now["distributed_optimizer"]:
                raise ValueError(f"{directory}: saved with parallel.distributed_optimizer="
                                 f"{str(saved['distributed_optimizer']).lower()}; resume with the same setting")
            if now["distributed_optimizer"] and (saved["tp"], saved["pp"]) != (now["tp"], now["pp"]):
                raise ValueError(f"{directory}: its distributed-optimizer state ({saved['optimizer_format']}) "
                                 f"reshards over data parallel only; it was saved at parallel.tp={saved['tp']} "
                                 f"parallel.pp={saved['pp']}, resume with those")
        policy = self.model.module
        load_checkpoint(policy, os.path.join(directory, "policy"))
        opt_sd = ckpt.optimizer_sharded_state_dict(self.optimizer, policy.sharded_state_dict(), is_loading=True)
        from megatron_rcpa.convert.safe_metadata import check_dcp_metadata, restricted_metadata

        opt_dir = os.path.join(directory, "optimizer")
        check_dcp_metadata(opt_dir)  # a planted pickle is refused with a clear error on every rank ...
        with restricted_metadata():  # ... and never executed
            loaded = dist_checkpointing.load(opt_sd, opt_dir)
        with torch.no_grad():  # the distributed optimizer copies into views of the (fp32) parameters
            self.optimizer.load_state_dict(loaded[0] if isinstance(loaded, tuple) else loaded)
        self.step = int(state["step"])
        self.optimizer.skipped_total = int(state.get("skipped_updates", 0))
        self.curriculum.load_state_dict(state["curriculum"])
        self.sampler.load_state_dict(state["sampler"])

    # -------------------------------------------------------------------------------------------- step
    def train_one_step(self) -> Dict[str, Any]:
        """One RL step: this rank's prompts -> rollout -> score -> advantages -> logprobs -> update."""
        ctx, times = self.ctx, {}
        t0 = time.perf_counter()
        samples = self.sampler.next_batch()  # this rank's share; an unreadable image: the next loadable sample
        if self._truncate is not None:  # data.long_prompts=truncate: the accepted samples' fitting texts
            samples = [self._truncate(s) for s in samples]
        traj = phases.plan_step(ctx, self.step, [self.family.format(s) for s in samples], samples)
        sft = self.cfg.run.mode == "sft"
        traj = phases.imitate(ctx, traj) if sft else phases.rollout(ctx, traj)
        times["rollout"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        if not sft:
            traj = phases.score(ctx, traj, self.reward_fn)
        traj = phases.advantages(ctx, traj)
        traj = phases.logprobs(ctx, traj)
        times["logprob"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        train_metrics = phases.update(ctx, traj)
        times["train"] = time.perf_counter() - t2

        g = self.cfg.rcpa.group_size
        n_prompts = len(traj.plan.keys)
        cur = {} if sft else self.curriculum.update(traj.plan, [traj.all_rewards[i * g:(i + 1) * g]
                                                                for i in range(n_prompts)])
        metrics = phases.step_metrics(ctx, traj, train_metrics, cur, times)
        self.step += 1
        metrics["phase_name"] = "sft" if sft else self.curriculum.phase
        if sft:
            metrics.pop("zero_var_frac", None)  # no groups of rollouts
        return metrics

    def validate(self) -> Dict[str, float]:
        """``val/*`` metrics of the held-out set at the current step (logged; generations written)."""
        from megatron_rcpa.train.validation import validate, validation_line

        m = validate(self.ctx, self.val_samples, self.family.format, self.reward, self.tok.decode, self.step,
                     greedy=self.cfg.run.val_greedy, max_generations=self.cfg.run.val_generations,
                     write=self.is_logger)
        if m:
            self.logger.info(validation_line(self.step, m))
        return m

    def _validate_now(self) -> bool:
        every = self.cfg.run.val_interval
        return bool(self.val_samples) and ((every and self.step % every == 0) or self.step == self.cfg.run.steps)

    def fit(self) -> List[Dict[str, float]]:
        """Train from the resumed step to ``run.steps``, saving every ``save_interval`` steps and at the end.
        A stop request (signal, stop file, time budget: train/stop.py) ends the loop after the current step
        with a save; the process then exits 0 before ``run.steps``."""
        cfg = self.cfg
        resume = self.resume_dir()
        if resume is not None:
            self.load(resume)
            self.logger.info(f"resumed from {resume} at step {self.step}")
        history: List[Dict[str, float]] = []
        saved_step = self.step if resume is not None else None
        stop = StopRequests(cfg.run.save_signals, cfg.run.stop_file_path(), cfg.run.save_by_seconds).install()
        device = next(self.model.parameters()).device
        self.logger.start(self.step)
        if cfg.run.val_before_train and self.val_samples and self.step == 0:
            self.logger.record(0, self.validate())  # the baseline, before any update
        try:
            while self.step < cfg.run.steps:
                t0 = time.perf_counter()
                skipped_before = self.optimizer.skipped_total
                m = self.train_one_step()
                if self._validate_now():
                    m.update(self.validate())
                stop.record_step_time(time.perf_counter() - t0)
                m["skipped_updates"] = float(self.optimizer.skipped_total)
                history.append(m)
                self.logger.log(self.step, m)
                if self.optimizer.skipped_total > skipped_before:
                    self._on_skipped_update(m)
                if cfg.run.save_interval and self.step % cfg.run.save_interval == 0 and self.step < cfg.run.steps:
                    saved_step = self._timed_save(stop)
                reason = stop.check(device)
                if reason is not None and self.step < cfg.run.steps:
                    if saved_step != self.step:
                        saved_step = self._timed_save(stop)
                    stop.clear_stop_file()
                    self.logger.info(STOP_LINE.format(reason=reason, step=self.step))
                    break
            if self.step == cfg.run.steps and saved_step != self.step:
                self._timed_save(stop)
                stop.clear_stop_file()  # a request that came with the last step is served by the final save
            if self.step == cfg.run.steps and cfg.run.export_hf:
                self.export_hf()
        finally:
            stop.uninstall()
            self.logger.close()
        return history

    def export_hf(self) -> str:
        """``run.export_hf``: the final policy as an HF directory ``<output_dir>/hf_export`` (collective; the
        policy in memory is the final checkpoint's ``policy/``, whose metadata and tokenizer files it takes)."""
        from megatron_rcpa.convert.checkpoint import ASSETS_DIR, read_metadata
        from megatron_rcpa.train.hf_checkpoint import EXPORT_DIR, export_policy

        policy_dir = os.path.join(self.checkpoint_dir(self.step), "policy")
        out = os.path.join(self.cfg.run.output_dir, EXPORT_DIR)
        t0 = time.perf_counter()
        meta = read_metadata(policy_dir)
        files = export_policy(self.model.module, meta, out, assets_dir=os.path.join(policy_dir, ASSETS_DIR),
                              max_shard_size=self.cfg.run.export_max_shard_size, dp_rank=self.dp_rank)
        if files is not None:
            self.logger.info(f"exported the step-{self.step} policy to {out} ({len(files)} safetensors file(s), "
                             f"{time.perf_counter() - t0:.1f} s)")
        return out

    def _on_skipped_update(self, m: Dict[str, float]) -> None:
        n, limit = self.optimizer.consecutive_skips, self.cfg.optim.max_skipped_updates
        self.logger.info(f"step {self.step}: update skipped, non-finite gradient norm {m.get('grad_norm')} "
                         f"(loss {m.get('loss')}); {n} in a row, {self.optimizer.skipped_total} in all")
        if n >= limit:
            raise NonFiniteUpdateError(
                f"{n} consecutive updates had a non-finite gradient norm (optim.max_skipped_updates={limit}), "
                f"last at step {self.step}: the weights were left unchanged and nothing non-finite was saved; "
                "lower optim.lr or check the data and rewards, then resume from the newest checkpoint")

    def _timed_save(self, stop: StopRequests) -> int:
        t0 = time.perf_counter()
        self.save()
        stop.record_save_time(time.perf_counter() - t0)
        return self.step


def run(cfg: TrainConfig) -> List[Dict[str, float]]:
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        if torch.distributed.is_initialized() and "RANK" not in os.environ:
            torch.distributed.destroy_process_group()


__all__ = ["Trainer", "run", "init_parallel", "build_policy", "build_tokenizer_and_config", "lr_at", "PRE_ALIGNMENT"]
