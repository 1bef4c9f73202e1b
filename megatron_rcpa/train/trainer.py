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
import shutil
import time
from typing import Any, Dict, List, Optional

import torch

from megatron_rcpa.algo.curriculum import PRE_ALIGNMENT, Curriculum
from megatron_rcpa.rollout.engine import RolloutEngine, SamplingParams
from megatron_rcpa.rollout.sampling import StopChecker
from megatron_rcpa.train import phases
from megatron_rcpa.train.config import TrainConfig
from megatron_rcpa.train.families import adapter_for, build_tokenizer_and_config, char_tokenizer_metadata
from megatron_rcpa.train.metrics_log import MetricsLogger
from megatron_rcpa.train.phases import StepContext, Trajectory, check_batch_layout, lr_at

STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"


# ---------------------------------------------------------------------------------------------- set-up
def init_parallel(cfg: TrainConfig) -> None:
    """torch.distributed (torchrun env, or a single process) + megatron parallel state."""
    import datetime

    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not torch.cuda.is_available():
        from megatron_rcpa.testing.cpu_shim import install_cpu_shim

        install_cpu_shim()
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" not in os.environ:  # plain `python -m megatron_rcpa.train`: one process
            store = torch.distributed.TCPStore("127.0.0.1", 0, 1, is_master=True)
            torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1,
                                                 timeout=datetime.timedelta(minutes=30))
        else:
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    world = torch.distributed.get_world_size()
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of parallel.tp x parallel.pp = {tp} x {pp}")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    if not torch.cuda.is_available():
        from megatron_rcpa.testing.cpu_shim import install_cpu_shim

        install_cpu_shim()  # re-scan megatron modules imported just now
    torch.manual_seed(cfg.run.seed)
    model_parallel_cuda_manual_seed(cfg.run.seed)


def build_policy(cfg: TrainConfig, hf_config, *, seed_offset: int = 0, load: bool = True, **build_kwargs: Any):
    """This rank's policy stage: the checkpoint's weights (``load=False``: its architecture with megatron's
    random init), or (``model.tiny``) weights drawn per tensor from its global name, the same at every TP/PP
    layout. ``build_kwargs`` go to the family's builder (e.g. the profiler's ``transformer_layer_spec``)."""
    from megatron_rcpa.convert.families import family_by_name

    dtype = torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32
    if cfg.model.tiny:
        from megatron_rcpa.testing.models import init_global_weights

        policy = family_by_name(cfg.model.family).build_policy(hf_config, params_dtype=dtype, **build_kwargs)
        # (megatron's own CPU init is not PP-invariant, and tied embedding copies must start equal)
        seed = cfg.run.seed + seed_offset
        init_global_weights(policy.language_model, seed=seed)
        if cfg.model.family == "llava" and policy.vision_model is not None:  # megatron modules, TP-sharded
            init_global_weights(policy.vision_model, seed=seed + 1)
            init_global_weights(policy.vision_projection, seed=seed + 2)
        elif policy.vision_model is not None:  # the HF tower, replicated
            _init_by_name(policy.vision_model, seed, policy.config.init_method_std)
        return policy
    from megatron_rcpa.convert.checkpoint import build_policy_from_checkpoint

    policy, _ = build_policy_from_checkpoint(cfg.model.checkpoint, load=load, params_dtype=dtype, **build_kwargs)
    return policy


@torch.no_grad()
def _init_by_name(module: torch.nn.Module, seed: int, std: float) -> None:
    """Replicated (non-TP) modules such as the HF vision tower: N(0, std) per tensor (norm scales 1 + that),
    from a generator seeded by (seed, parameter name): identical on every rank and layout."""
    import zlib

    for name, p in module.named_parameters():
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62))
        full = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
        if "norm" in name and name.endswith("weight"):
            full += 1.0
        p.copy_(full.to(device=p.device, dtype=p.dtype))


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
    """The held-out samples of ``data.val_path`` (the first ``data.val_max_samples``), or [] without one."""
    if not cfg.data.val_path:
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
    number of tokens); ``policy_kwargs`` go to the family's policy builder (the profiler's FP8 layer spec)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    check_batch_layout(cfg, groups.dp_size)
    policy = build_policy(cfg, hf_config, **(policy_kwargs or {}))
    model = DistributedDataParallel(policy.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.parallel.distributed_optimizer), policy)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=cfg.optim.lr, min_lr=cfg.optim.min_lr, weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.adam_beta1, adam_beta2=cfg.optim.adam_beta2, clip_grad=cfg.optim.clip_grad,
        bf16=cfg.model.dtype == "bf16", params_dtype=policy.config.params_dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer), [model])
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
                           banned_token_ids=family.structural_ids(), groups=groups)
    kernels = cfg.run.kernels
    impl = ("triton" if torch.cuda.is_available() else "torch") if kernels == "auto" else kernels
    return StepContext(cfg=cfg, groups=groups, model=model, optimizer=optimizer, engine=engine,
                       curriculum=Curriculum(cfg.rcpa.curriculum), forward_fn=family.forward_fn,
                       micro_batch_inputs=family.micro_batch_inputs, vocab_size=policy.vocab_size,
                       pad_id=tok.pad_token_id, impl=impl, reference=reference)


class Trainer:
    """Builds the step context, the data and the logger; runs the phases of :mod:`megatron_rcpa.train.phases`
    step after step; saves and resumes."""

    def __init__(self, cfg: TrainConfig) -> None:
        from megatron_rcpa.data.sampler import PromptSampler
        from megatron_rcpa.rewards import get_reward
        from megatron_rcpa.train.step import resolve_groups

        self.cfg = cfg
        init_parallel(cfg)
        self.groups = resolve_groups()
        self.rank = torch.distributed.get_rank()
        self.dp_rank, self.dp_size = self.groups.dp_rank, self.groups.dp_size
        self.is_logger = self.rank == torch.distributed.get_world_size() - 1  # a last-stage rank holds metrics
        check_batch_layout(cfg, self.dp_size)
        self.tok, self.hf_config = build_tokenizer_and_config(cfg)
        self.family = adapter_for(cfg.model.family, self.tok, self.hf_config, checkpoint=cfg.model.checkpoint)
        self.ctx = build_step_context(cfg, self.groups, self.tok, self.hf_config, self.family)
        self.model, self.optimizer, self.reference = self.ctx.model, self.ctx.optimizer, self.ctx.reference
        self.engine, self.curriculum = self.ctx.engine, self.ctx.curriculum
        self.vocab_size = self.ctx.vocab_size
        self.model_config = self.model.module.config
        self.dataset = build_dataset(cfg)
        # the global batch is data.prompts_per_step prompts; this rank loads only its share of them
        self.sampler = PromptSampler(self.dataset, cfg.data.prompts_per_step // self.dp_size, seed=cfg.run.seed,
                                     shuffle=cfg.data.shuffle, dp_rank=self.dp_rank, dp_size=self.dp_size,
                                     accept=PromptSampler.length_check(self.family.format, cfg.data.max_prompt_tokens))
        self.reward = get_reward(cfg.reward.name, api=cfg.reward.api, **cfg.reward.kwargs)
        fit = getattr(self.reward.fn, "fit_references", None)
        if callable(fit):  # e.g. CIDEr-D's document frequencies: once, on the training references (any layout)
            fit(reference_sets(self.dataset))
        self.impl = self.ctx.impl
        self.val_samples = build_val_samples(cfg)
        self.step = 0
        self.logger = MetricsLogger(cfg, enabled=self.is_logger)

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
        return os.path.join(self.cfg.run.output_dir, "checkpoints", f"step_{step:07d}")

    def save(self) -> str:
        """Policy (convertible to HF), optimizer, curriculum and data cursor; written aside, then renamed."""
        from megatron.core import dist_checkpointing

        from megatron_rcpa.convert.checkpoint import (
            ASSETS_DIR,
            CheckpointMetadata,
            _synchronous_writer,
            read_metadata,
            save_checkpoint,
        )

        final = self.checkpoint_dir(self.step)
        tmp = final + ".incomplete"
        if self.rank == 0 and os.path.exists(tmp):
            shutil.rmtree(tmp)
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
        with _synchronous_writer():
            opt_sd = self.optimizer.sharded_state_dict(policy.sharded_state_dict())
            dist_checkpointing.save(opt_sd, os.path.join(tmp, "optimizer"))
        if self.rank == 0:
            state = {"step": self.step, "curriculum": self.curriculum.state_dict(),
                     "sampler": self.sampler.state_dict(), "config": self.cfg.to_dict()}
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(state, f)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
            with open(os.path.join(self.cfg.run.output_dir, LATEST_FILE + ".tmp"), "w") as f:
                f.write(os.path.basename(final))
            os.replace(os.path.join(self.cfg.run.output_dir, LATEST_FILE + ".tmp"),
                       os.path.join(self.cfg.run.output_dir, LATEST_FILE))
        torch.distributed.barrier()
        return final

    def resume_dir(self) -> Optional[str]:
        r = self.cfg.run.resume
        if r == "never":
            return None
        if r != "auto":
            return r
        latest = os.path.join(self.cfg.run.output_dir, LATEST_FILE)
        if not os.path.isfile(latest):
            return None
        with open(latest) as f:
            return os.path.join(self.cfg.run.output_dir, "checkpoints", f.read().strip())

    def load(self, directory: str) -> None:
        from megatron.core import dist_checkpointing

        from megatron_rcpa.convert.checkpoint import load_checkpoint

        state_path = os.path.join(directory, STATE_FILE)
        if not os.path.isfile(state_path):
            raise FileNotFoundError(f"{directory!r} is not a complete trainer checkpoint ({STATE_FILE} missing)")
        policy = self.model.module
        load_checkpoint(policy, os.path.join(directory, "policy"))
        opt_sd = self.optimizer.sharded_state_dict(policy.sharded_state_dict(), is_loading=True)
        loaded = dist_checkpointing.load(opt_sd, os.path.join(directory, "optimizer"))
        self.optimizer.load_state_dict(loaded[0] if isinstance(loaded, tuple) else loaded)
        with open(state_path) as f:
            state = json.load(f)
        self.step = int(state["step"])
        self.curriculum.load_state_dict(state["curriculum"])
        self.sampler.load_state_dict(state["sampler"])

    # -------------------------------------------------------------------------------------------- step
    def train_one_step(self) -> Dict[str, Any]:
        """One RL step: this rank's prompts -> rollout -> score -> advantages -> logprobs -> update."""
        ctx, times = self.ctx, {}
        t0 = time.perf_counter()
        samples = self.sampler.next_batch()  # this rank's share; an unreadable image: the next loadable sample
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
        cfg = self.cfg
        resume = self.resume_dir()
        if resume is not None:
            self.load(resume)
            self.logger.info(f"resumed from {resume} at step {self.step}")
        history = []
        if cfg.run.val_before_train and self.val_samples and self.step == 0:
            self.logger.record(0, self.validate())  # the baseline, before any update
        self.logger.start(self.step)
        while self.step < cfg.run.steps:
            m = self.train_one_step()
            if self._validate_now():
                m.update(self.validate())
            history.append(m)
            self.logger.log(self.step, m)
            if cfg.run.save_interval and self.step % cfg.run.save_interval == 0 and self.step < cfg.run.steps:
                self.save()
        if self.step == cfg.run.steps and (resume is None or history):
            self.save()
        self.logger.close()
        return history


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
