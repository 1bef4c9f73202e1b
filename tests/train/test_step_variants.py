"""Training-step throughput options keep the numbers: with one update per step the old-policy log-probs come
from the training forward (no second forward), and length-bucketed micro-batches pad less; both give the
loss, gradient norm and log-prob mismatch of the plain path."""

from __future__ import annotations

import pytest

from megatron_rcpa.rollout.batch import Rollout
from megatron_rcpa.testing import run_distributed
from megatron_rcpa.train.phases import _groups_by_length

KEYS = ("loss", "grad_norm", "imit_nll", "entropy", "reward", "logp_mismatch")


def variant_worker(overrides: list) -> dict:
    from megatron_rcpa.train import phases, step
    from megatron_rcpa.train.config import load_config
    from megatron_rcpa.train.trainer import Trainer

    calls = {"logprob_passes": 0}
    real = step.compute_logprobs

    def counting(*args, **kwargs):
        calls["logprob_passes"] += 1
        return real(*args, **kwargs)

    phases.compute_logprobs = counting
    cfg = load_config("examples/configs/tiny_cpu.yaml", [
        "run.steps=2", "run.save_interval=0", "run.resume=never", "run.progress_bar=false",
        "logging.tensorboard=false", "data.prompts_per_step=4", "rcpa.group_size=2", "optim.micro_batch_size=2",
        "rollout.max_new_tokens=8", "run.output_dir=/tmp/unused-variants", *overrides])
    trainer = Trainer(cfg)
    history = [trainer.train_one_step() for _ in range(2)]
    return {"history": history, **calls}


@pytest.mark.multiproc
@pytest.mark.megatron
def test_skipped_old_logprob_forward_and_length_buckets_keep_the_numbers():
    plain = run_distributed(variant_worker, args=(["optim.recompute_old_logp=always",
                                                   "optim.length_buckets=false"],), world_size=1, timeout=300)[0]
    fast = run_distributed(variant_worker, args=([],), world_size=1, timeout=300)[0]
    assert plain["logprob_passes"] == 2 and fast["logprob_passes"] == 0  # beta = 0: no reference pass either
    for a, b in zip(plain["history"], fast["history"]):
        for k in KEYS:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k
        assert b["padding_frac"] <= a["padding_frac"]
    assert any(b["padding_frac"] < a["padding_frac"] for a, b in zip(plain["history"], fast["history"]))


def test_groups_by_length_keeps_groups_whole_longest_first():
    def r(pid, n):
        return Rollout(prompt_id=pid, prompt_tokens=[1], prefix_tokens=[], generated_tokens=[2] * n,
                       rollout_logp=[0.0] * n)

    rollouts = [r(0, 1), r(0, 2), r(1, 5), r(1, 1), r(2, 3), r(2, 3)]
    assert _groups_by_length(rollouts, 2) == [2, 3, 4, 5, 0, 1]


def sft_worker() -> dict:
    from megatron_rcpa.rollout import engine
    from megatron_rcpa.train.config import load_config
    from megatron_rcpa.train.trainer import Trainer

    def no_rollouts(*args, **kwargs):
        raise AssertionError("run.mode=sft must not generate")

    engine.RolloutEngine.generate = no_rollouts
    cfg = load_config("examples/configs/tiny_cpu.yaml", [
        "run.mode=sft", "run.steps=3", "run.save_interval=0", "run.resume=never", "run.progress_bar=false",
        "logging.tensorboard=false", "data.prompts_per_step=4", "rcpa.group_size=4", "optim.micro_batch_size=2",
        "optim.lr=0.001", "run.output_dir=/tmp/unused-sft"])
    trainer = Trainer(cfg)
    return {"history": [trainer.train_one_step() for _ in range(3)]}


@pytest.mark.multiproc
@pytest.mark.megatron
def test_sft_mode_imitates_the_reference_without_rollouts():
    history = run_distributed(sft_worker, world_size=1, timeout=300)[0]["history"]
    assert [h["phase_name"] for h in history] == ["sft"] * 3
    nll = [h["imit_nll"] for h in history]
    assert nll[0] > nll[1] > nll[2]  # the reference is learned
    for h in history:
        assert h["loss"] == pytest.approx(h["imit_nll"], rel=1e-5)  # lambda = 1, nothing generated
        assert h["gen_tokens"] == 0 and h["seq_tokens"] > 0


def freeze_worker(family: str) -> dict:
    import torch

    from megatron_rcpa.train.config import load_config
    from megatron_rcpa.train.trainer import Trainer

    cfg = load_config("examples/configs/tiny_cpu.yaml", [
        f"model.family={family}", "model.freeze_vision=true", "run.steps=1", "run.save_interval=0",
        "run.resume=never", "run.progress_bar=false", "logging.tensorboard=false", "data.prompts_per_step=2",
        "rcpa.group_size=2", "optim.micro_batch_size=4", "run.val_before_train=false",
        "run.output_dir=/tmp/unused-freeze"])
    trainer = Trainer(cfg)
    policy = trainer.model.module
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    trainer.train_one_step()
    changed = {n: not torch.equal(before[n], p.detach()) for n, p in policy.named_parameters()}
    return {"changed": changed, "trainable": {n: p.requires_grad for n, p in policy.named_parameters()}}


@pytest.mark.multiproc
@pytest.mark.megatron
@pytest.mark.parametrize("family, vision, projector", [("qwen2_5_vl", "vision_model.blocks", "vision_model.merger"),
                                                       ("llava", "vision_model.", "vision_projection.")])
def test_freeze_vision_trains_the_language_model_only(family, vision, projector):
    out = run_distributed(freeze_worker, args=(family,), world_size=1, timeout=300)[0]
    frozen = [n for n in out["changed"] if n.startswith(vision)]
    assert frozen and not any(out["changed"][n] or out["trainable"][n] for n in frozen)
    assert any(out["changed"][n] for n in out["changed"] if n.startswith("language_model."))
    assert all(out["trainable"][n] for n in out["changed"] if n.startswith(projector))


def test_freezing_a_text_model_is_a_config_error():
    from megatron_rcpa.train.config import check_runnable, load_config

    cfg = load_config(None, ["model.family=llama", "model.tiny=true", "model.freeze_vision=true",
                             "data.prompts_per_step=2", "rcpa.group_size=2", "optim.micro_batch_size=2"])
    with pytest.raises(ValueError, match="model.freeze_vision = true but model.family = 'llama' has no vision"):
        check_runnable(cfg, world_size=1)


@pytest.mark.multiproc
@pytest.mark.megatron
def test_vision_recompute_keeps_the_numbers():
    common = ["model.family=qwen2_5_vl", "data.prompts_per_step=2", "rcpa.group_size=2", "optim.micro_batch_size=4"]
    plain = run_distributed(variant_worker, args=(common,), world_size=1, timeout=300)[0]["history"]
    ckpt = run_distributed(variant_worker, args=(common + ["model.vision_recompute=true"],), world_size=1,
                           timeout=300)[0]["history"]
    for a, b in zip(plain, ckpt):
        for k in ("loss", "grad_norm", "imit_nll"):
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), k
