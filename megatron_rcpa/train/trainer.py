"""The RCPA training loop, top to bottom (RCPA_SPEC sections 2-5).

Every step, on every rank (TP x PP x DP, Megatron's parallel state):

1. data      the next global batch of prompts (identical on every rank), this DP rank takes its slice
2. plan      the curriculum picks probes and forced prefix lengths k_i for the whole global batch
3. rollout   prompt ⊕ y*_{1..k_i} -> G sampled continuations on the training policy (KV cache)
4. reward    the reward function judges prefix ⊕ continuation; rewards are gathered over DP
5. advantage group advantages per prompt (fused kernel on GPU)
6. logprob   old-policy (and reference, when beta > 0) log-probs recomputed through the schedule
7. train     the RCPA loss through megatron's schedule, DDP, optimizer, LR schedule (train/step.py)
8. update    the curriculum folds in the global rewards; metrics are logged; checkpoint at intervals

All randomness is derived from (seed, step, rank): a resumed run takes the identical next step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import time
from typing import Any, Dict, List, Optional

import torch

from megatron_rcpa.algo.curriculum import PRE_ALIGNMENT, Curriculum
from megatron_rcpa.rollout.batch import pack_rollouts
from megatron_rcpa.rollout.engine import RolloutEngine, SamplingParams
from megatron_rcpa.rollout.sampling import StopChecker
from megatron_rcpa.train.config import TrainConfig
from megatron_rcpa.train.families import adapter_for, build_tokenizer_and_config
from megatron_rcpa.train.metrics_log import MetricsLogger
from megatron_rcpa.train.step import StepConfig, compute_logprobs, split_micro_batches, train_step

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


def build_policy(cfg: TrainConfig, hf_config, *, seed_offset: int = 0):
    """This rank's policy stage: the checkpoint's weights, or (``model.tiny``) weights the family draws per
    tensor from its global name, the same at every TP/PP layout."""
    from megatron_rcpa.models import families

    dtype = torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32
    if cfg.model.tiny:
        family = families.get(cfg.model.family)
        policy = family.build_policy(hf_config, params_dtype=dtype)
        family.init_tiny_weights(policy, cfg.run.seed + seed_offset)
        return policy
    from megatron_rcpa.convert.checkpoint import build_policy_from_checkpoint

    policy, _ = build_policy_from_checkpoint(cfg.model.checkpoint, params_dtype=dtype)
    return policy


def build_dataset(cfg: TrainConfig):
    if cfg.data.path is None:
        from megatron_rcpa.data.synthetic import make_synthetic_dataset

        return make_synthetic_dataset(cfg.data.synthetic, cfg.data.synthetic_size, seed=cfg.run.seed,
                                      image_size=cfg.data.image_size, reference_style=cfg.data.synthetic_reference)
    from megatron_rcpa.data.readers import ReaderConfig, load_samples

    rc = ReaderConfig(prompt_field=cfg.data.prompt_key, reference_field=cfg.data.reference_key,
                      image_field=cfg.data.image_key)
    ds = load_samples(cfg.data.path, config=rc)
    if ds.stats.total_skipped:
        print(f"[data] {ds.stats.summary()}", flush=True)
    return ds


def lr_at(cfg: TrainConfig, step: int) -> float:
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    x = min(1.0, (step - o.warmup_steps) / max(1, cfg.run.steps - o.warmup_steps))
    if o.lr_schedule == "cosine":
        return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(math.pi * x))
    if o.lr_schedule == "linear":
        return o.lr + (o.min_lr - o.lr) * x
    return o.lr


# ---------------------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from megatron_rcpa.data.sampler import PromptSampler
        from megatron_rcpa.rewards import get_reward

        self.cfg = cfg
        init_parallel(cfg)
        self.rank = torch.distributed.get_rank()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.is_logger = self.rank == torch.distributed.get_world_size() - 1  # a last-stage rank holds metrics
        self.tok, self.hf_config = build_tokenizer_and_config(cfg)
        self.family = adapter_for(cfg.model.family, self.tok, self.hf_config, checkpoint=cfg.model.checkpoint)
        policy = build_policy(cfg, self.hf_config)
        self.vocab_size = policy.vocab_size
        self.model_config = policy.config
        self.model = DistributedDataParallel(policy.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.parallel.distributed_optimizer), policy)
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=cfg.optim.lr, min_lr=cfg.optim.min_lr, weight_decay=cfg.optim.weight_decay,
            adam_beta1=cfg.optim.adam_beta1, adam_beta2=cfg.optim.adam_beta2, clip_grad=cfg.optim.clip_grad,
            bf16=cfg.model.dtype == "bf16", params_dtype=policy.config.params_dtype,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer), [self.model])
        policy.config.finalize_model_grads_func = finalize_model_grads
        self.reference = None
        if cfg.rcpa.loss.beta > 0:  # frozen reference: model.reference_checkpoint, else the initial policy
            self.reference = build_policy(cfg, self.hf_config)
            if cfg.model.reference_checkpoint:
                from megatron_rcpa.convert.checkpoint import load_checkpoint

                load_checkpoint(self.reference, cfg.model.reference_checkpoint)
            else:
                self.reference.load_state_dict(policy.state_dict())
            self.reference.eval().requires_grad_(False)
        self.dataset = build_dataset(cfg)
        self.sampler = PromptSampler(self.dataset, cfg.data.prompts_per_step, seed=cfg.run.seed,
                                     shuffle=cfg.data.shuffle, dp_rank=0, dp_size=self.dp_size)
        self.curriculum = Curriculum(cfg.rcpa.curriculum)
        self.reward_fn = get_reward(cfg.reward.name, **cfg.reward.kwargs)
        stop = StopChecker([self.tok.eos_token_id], cfg.rollout.stop, self.tok.decode)
        self.engine = RolloutEngine(policy, vocab_size=self.vocab_size, pad_id=self.tok.pad_token_id, stop=stop,
                                    params=SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p,
                                                          cfg.rollout.max_new_tokens), seed=cfg.run.seed,
                                    banned_token_ids=self.family.structural_ids())
        kernels = cfg.run.kernels
        self.impl = ("triton" if torch.cuda.is_available() else "torch") if kernels == "auto" else kernels
        self.step = 0
        self.logger = MetricsLogger(cfg, enabled=self.is_logger)

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
                                  padded_vocab_size=policy.padded_vocab_size, extra={"step": self.step})
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
    def train_one_step(self) -> Dict[str, float]:
        from megatron.core import parallel_state as ps

        from megatron_rcpa.ops import group_advantages

        cfg, g = self.cfg, self.cfg.rcpa.group_size
        times: Dict[str, float] = {}
        t0 = time.perf_counter()
        indices = self.sampler.next_global_indices()
        samples = [self.sampler.load(i) for i in indices]  # an unreadable image: the next loadable sample
        prompts = [self.family.format(s) for s in samples]
        keys = [str(s.id) for s in samples]
        lengths = [len(p.reference_ids) if p.reference_ids is not None else None for p in prompts]
        plan = self.curriculum.plan(keys, lengths)
        b = cfg.data.prompts_per_step
        mine = slice(self.dp_rank * b, (self.dp_rank + 1) * b)
        rollouts = self.engine.generate(prompts[mine], plan.k[mine], g, step=self.step, dp_rank=self.dp_rank)
        times["rollout"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        responses = [self.tok.decode(r.response_tokens) for r in rollouts]
        refs = [prompts[mine][r.prompt_id].reference for r in rollouts]
        local_rewards = self.reward_fn(responses, refs)
        gathered: List[Any] = [None] * self.dp_size
        torch.distributed.all_gather_object(gathered, local_rewards, group=ps.get_data_parallel_group())
        all_rewards = [x for part in gathered for x in part]
        dev = next(self.model.parameters()).device  # the Triton kernel needs the rewards on the GPU
        rewards_t = torch.tensor(local_rewards, dtype=torch.float32, device=dev)
        adv = group_advantages(rewards_t, torch.tensor([r.prompt_id for r in rollouts], device=dev),
                               estimator=cfg.rcpa.advantage.estimator, eps=cfg.rcpa.advantage.eps,
                               batch_std=cfg.rcpa.advantage.batch_std, impl=self.impl)
        batch = pack_rollouts(rollouts, adv.advantages.tolist(), pad_id=self.tok.pad_token_id, pad_to_multiple=8)
        micro = split_micro_batches(batch, min(cfg.optim.micro_batch_size, batch.num_rollouts), g)
        per_micro = micro[0].num_rollouts
        extras = [self.family.micro_batch_inputs(prompts[mine], rollouts[i * per_micro:i * per_micro + m.num_rollouts])
                  for i, m in enumerate(micro)]
        from megatron_rcpa.models.policy_base import trainer_forward  # one forward_fn for every family

        lambda_t = self.curriculum.lambda_t(cfg.rcpa.loss.lambda_0)
        step_cfg = StepConfig(loss=cfg.rcpa.loss, lambda_t=lambda_t, temperature=cfg.rollout.temperature,
                              vocab_size=self.vocab_size, impl=self.impl)
        old = compute_logprobs(self.model, micro, step_cfg, trainer_forward, extras=extras)
        ref = (compute_logprobs(self.reference, micro, step_cfg, trainer_forward, extras=extras)
               if self.reference is not None else None)
        times["logprob"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(cfg, self.step)
        n_up = cfg.optim.updates_per_step
        per = max(1, len(micro) // n_up)
        train_metrics: Dict[str, float] = {}
        for u in range(0, len(micro), per):
            sl = slice(u, u + per)
            m = train_step(self.model, self.optimizer, micro[sl], old[sl] if old is not None else None, step_cfg,
                           ref_logp=ref[sl] if ref is not None else None, forward_fn=trainer_forward,
                           extras=extras[sl])
            for k, v in m.items():
                train_metrics[k] = train_metrics.get(k, 0.0) + v / math.ceil(len(micro) / per)
        times["train"] = time.perf_counter() - t2

        cur = self.curriculum.update(plan, [all_rewards[i * g:(i + 1) * g] for i in range(len(keys))])
        self.step += 1
        gen_tokens = float(batch.gen_mask.sum())
        mismatch = 0.0
        if old is not None:
            lp = torch.cat([o.float() for o in old])
            mismatch = float(((lp - batch.rollout_logp).abs() * batch.gen_mask).sum() / max(gen_tokens, 1.0))
        total = sum(times.values())
        metrics = dict(cur)
        metrics.update({k: v for k, v in train_metrics.items()})
        metrics.update({
            "lambda_t": lambda_t, "zero_var_frac": adv.zero_var_frac, "lr": lr_at(cfg, self.step - 1),
            "response_length": statistics.mean(len(r.response_tokens) for r in rollouts),
            "logp_mismatch": mismatch, "time_rollout": times["rollout"], "time_logprob": times["logprob"],
            "time_train": times["train"], "time_step": total,
            "tokens_per_s": float(batch.lengths.sum()) * self.dp_size / max(total, 1e-9),
        })
        metrics["phase_name"] = self.curriculum.phase
        return metrics

    def fit(self) -> List[Dict[str, float]]:
        cfg = self.cfg
        resume = self.resume_dir()
        if resume is not None:
            self.load(resume)
            self.logger.info(f"resumed from {resume} at step {self.step}")
        history = []
        self.logger.start(self.step)
        while self.step < cfg.run.steps:
            m = self.train_one_step()
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
