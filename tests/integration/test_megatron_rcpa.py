"""The RCPA loss on a real Megatron-Core model gives the same loss, gradients and Adam step at every layout.

A tiny Qwen2-style GPTModel (GQA, qkv bias, RMSNorm, SwiGLU, RoPE, tied embeddings, vocab 250 padded to
256) runs one training step on one fixed batch at TP=1 (the reference), TP=2, PP=2 and DP=2:

    logits (vocab-parallel) -> logp = -vocab_parallel_cross_entropy, entropy from the gathered logits
    -> rcpa_loss (clipped PG with dual clip, k3 KL to a reference, entropy bonus, imitation on the
       constrained prefix, seq_mean_token_mean aggregation) through megatron's forward_backward schedule
    -> megatron DDP gradients -> get_megatron_optimizer (Adam, lr 1e-3, grad clipping at 1.0) step.

Each layout is ONE spawn returning everything compared: per-token logp, loss and metrics, full (TP-gathered,
globally named) gradients, the grad norm and the updated weights.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from megatron_rcpa.testing import run_distributed

pytestmark = [pytest.mark.multiproc, pytest.mark.megatron]

VOCAB = 250  # padded to 256 by make_vocab_size_divisible_by=128 at TP 1 and 2
B, S = 4, 16  # 2 prompts x G=2 rollouts, 16 tokens each
PROMPT_LEN = 4
LR = 1e-3
TIMEOUT = 400.0  # a generous ceiling: 4 spawned ranks on 2 busy cores can take minutes to import


def _qwen_like_overrides() -> dict:
    return dict(num_query_groups=2, add_qkv_bias=True, add_bias_linear=False, normalization="RMSNorm",
                gated_linear_unit=True, activation_func=torch.nn.functional.silu)


def _loss_config():
    from megatron_rcpa.algo.config import LossConfig

    return LossConfig(eps_low=0.2, eps_high=0.28, dual_clip=3.0, beta=0.05, kl_type="k3", alpha=0.01,
                      aggregation="seq_mean_token_mean")


def make_batch(seed: int = 0) -> dict:
    """One fixed batch, [B, S] per token. Rollouts 2p and 2p+1 answer prompt p and share its prompt and its
    constrained prefix (prompt 0: 3 tokens, prompt 1: 2 tokens); generated lengths differ per rollout."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (B, S), generator=g)
    prefix_len = [3, 3, 2, 2]
    gen_len = [7, 5, 9, 6]
    prompt_ids = torch.tensor([0, 0, 1, 1])
    for b in range(B):  # a prompt's rollouts share the prompt and the forced prefix
        first = 2 * int(prompt_ids[b])
        end = PROMPT_LEN + prefix_len[b]
        tokens[b, :end] = tokens[first, :end]
    targets = torch.cat([tokens[:, 1:], torch.randint(0, VOCAB, (B, 1), generator=g)], dim=1)
    pos = torch.arange(S).expand(B, S)
    # the target at position t is token t+1: a response token j is predicted at position j-1
    start = torch.tensor([PROMPT_LEN - 1] * B)
    constrained = (pos >= start[:, None]) & (pos < (start + torch.tensor(prefix_len))[:, None])
    gen_start = start + torch.tensor(prefix_len)
    gen = (pos >= gen_start[:, None]) & (pos < (gen_start + torch.tensor(gen_len))[:, None])
    uniform = -math.log(256.0)  # the tiny model's log-probs are close to uniform over the padded vocab
    return {
        "tokens": tokens,
        "targets": targets,
        "gen_mask": gen,
        "constrained_mask": constrained,
        "seq_ids": torch.arange(B)[:, None].expand(B, S).contiguous(),
        "prompt_ids": prompt_ids[:, None].expand(B, S).contiguous(),
        "advantages": torch.tensor([1.0, -0.5, 0.8, -1.2])[:, None].expand(B, S).contiguous(),
        "old_logp": uniform + 0.15 * torch.randn(B, S, generator=g),
        "ref_logp": uniform + 0.15 * torch.randn(B, S, generator=g),
    }


def _loss_func(batch: dict, counts, dp_size: int, output_tensor: torch.Tensor):
    """Megatron loss_func on the last stage: vocab-parallel logits [b, s, v/tp] -> the RCPA loss."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from megatron_rcpa.algo.loss import rcpa_loss

    logits = output_tensor.float()
    full_logits = gather_from_tensor_model_parallel_region(logits)  # differentiable all-gather over TP
    entropy = -(full_logits.softmax(-1) * full_logits.log_softmax(-1)).sum(-1)
    logp = -vocab_parallel_cross_entropy(logits.clone(), batch["targets"])  # it edits its input in place
    loss, metrics = rcpa_loss(
        logp, batch["old_logp"], batch["advantages"], batch["gen_mask"], config=_loss_config(),
        ref_logp=batch["ref_logp"], entropy=entropy, constrained_mask=batch["constrained_mask"],
        seq_ids=batch["seq_ids"], prompt_ids=batch["prompt_ids"], lambda_t=0.3, counts=counts)
    metrics = dict(metrics, logp=logp.detach())
    # Normalised by global counts, the DP ranks' losses sum to the batch loss; DDP averages gradients over
    # DP, so each rank back-propagates dp_size times its share to get the gradient of the sum.
    return loss * dp_size, metrics


def _forward_step(batch: dict, counts, dp_size: int, data_iterator, model):
    micro = next(data_iterator)
    b, s = micro["tokens"].shape
    position_ids = torch.arange(s).expand(b, s)
    output = model(micro["tokens"], position_ids, None)  # causal mask built by megatron
    return output, partial(_loss_func, batch, counts, dp_size)


def train_step_worker(batch: dict, use_distributed_optimizer: bool = False) -> dict:
    """One RCPA training step at the current layout; returns what the test compares (on every rank)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rcpa.algo.loss import count_tokens
    from megatron_rcpa.testing import gather_global_tensors, rank_info, tiny_gpt_model, tiny_transformer_config

    info = rank_info()
    # data parallelism: each DP rank takes whole prompts (a prompt's rollouts must share one loss call)
    local_b = B // info.dp_size
    rows = slice(info.dp_rank * local_b, (info.dp_rank + 1) * local_b)
    local = {k: v[rows].contiguous() for k, v in batch.items()}
    counts = count_tokens(local["gen_mask"], local["constrained_mask"], local["seq_ids"], local["prompt_ids"])
    counts = counts.all_reduce(ps.get_data_parallel_group())

    config = tiny_transformer_config(**_qwen_like_overrides())
    model = tiny_gpt_model(config, vocab_size=VOCAB, max_seq=S, share_embeddings_and_output_weights=True)
    params_before = gather_global_tensors(model)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=use_distributed_optimizer)
    ddp_model = DistributedDataParallel(config, ddp_config, model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.0, clip_grad=1.0, bf16=False, fp16=False,
                        params_dtype=torch.float32, use_distributed_optimizer=use_distributed_optimizer),
        [ddp_model])
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()

    losses = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, local, counts, info.dp_size),
        data_iterator=iter([local]), model=[ddp_model], num_microbatches=1, seq_length=S,
        micro_batch_size=local_b, forward_only=False)
    # with the distributed optimizer each DP rank holds only its reduce-scattered shard of the gradients
    grads = {} if use_distributed_optimizer else gather_global_tensors(ddp_model, which="grad")
    update_ok, grad_norm, _ = optimizer.step()

    out = {"info": info, "grads": grads, "params_before": params_before,
           "params_after": gather_global_tensors(ddp_model), "update_ok": bool(update_ok),
           "grad_norm": float(grad_norm)}
    if ps.is_pipeline_last_stage():
        metrics = dict(losses[0])
        logp = torch.zeros(B, S)
        logp[rows] = metrics.pop("logp")
        torch.distributed.all_reduce(logp, group=ps.get_data_parallel_group())  # the other rows are 0
        for key in metrics:  # normalised globally: the batch value is the sum over DP ranks
            torch.distributed.all_reduce(metrics[key], group=ps.get_data_parallel_group())
        out["logp"] = logp
        out["metrics"] = {k: float(v) for k, v in metrics.items()}
    return out


def _merge(results: list) -> dict:
    """One layout-free view of a layout's results; tensors held by several ranks must agree exactly."""
    merged = {"grads": {}, "params_before": {}, "params_after": {}, "grad_norm": set(), "update_ok": set()}
    for r in results:
        for key in ("grads", "params_before", "params_after"):
            for name, t in r[key].items():
                seen = merged[key].setdefault(name, t)
                assert torch.equal(seen, t), f"{key}[{name}] differs between ranks of one layout ({r['info']})"
        merged["grad_norm"].add(r["grad_norm"])
        merged["update_ok"].add(r["update_ok"])
        if "metrics" in r:
            merged["metrics"], merged["logp"] = r["metrics"], r["logp"]
    assert len(merged["grad_norm"]) == 1, f"grad norm differs between ranks: {merged['grad_norm']}"
    assert merged["update_ok"] == {True}
    merged["grad_norm"] = merged["grad_norm"].pop()
    return merged


def _assert_close_tensors(actual: dict, expected: dict, what: str, rtol: float = 1e-5,
                          atol: float | None = None) -> None:
    """rtol elementwise; atol defaults to rtol x the tensor's largest magnitude, for elements that are ~0
    by cancellation (their absolute error is that of the large terms they are summed from)."""
    assert set(actual) == set(expected), f"{what}: names differ: {sorted(set(actual) ^ set(expected))}"
    for name, ref in expected.items():
        tol = rtol * float(ref.abs().max()) + 1e-12 if atol is None else atol
        torch.testing.assert_close(actual[name], ref, rtol=rtol, atol=tol,
                                   msg=lambda m, name=name: f"{what}[{name}]: {m}")


@pytest.fixture(scope="module")
def batch():
    return make_batch()


@pytest.fixture(scope="module")
def reference(batch):
    """TP=1, PP=1, DP=1 on one process."""
    return _merge(run_distributed(train_step_worker, world_size=1, args=(batch,), timeout=TIMEOUT))


def test_reference_step_is_meaningful(reference, batch):
    """Guard against a vacuous comparison: every term of the loss is active, every parameter learns."""
    m = reference["metrics"]
    assert m["imit_nll"] > 0 and m["kl_ref"] > 0 and m["entropy"] > 0
    assert 0 < m["clip_frac_low"] + m["clip_frac_high"] < 1, m
    assert reference["grad_norm"] > 0
    grads, before, after = reference["grads"], reference["params_before"], reference["params_after"]
    assert len(grads) == len(before) == len(after) > 20
    for name, g in grads.items():
        assert g.abs().max() > 0, f"{name} got no gradient"
        step = float((after[name] - before[name]).abs().max())
        assert 0.5 * LR < step < 1.5 * LR, f"{name}: largest change {step:g} is not one Adam step of ~lr"
    assert torch.isfinite(reference["logp"]).all()
    assert float(reference["logp"][batch["gen_mask"]].mean()) == pytest.approx(-math.log(256.0), abs=0.5)


LAYOUTS = {
    "tp2": dict(world_size=2, tp=2),
    "pp2": dict(world_size=2, pp=2),
    "dp2": dict(world_size=2),
    "dp2_distopt": dict(world_size=2, kwargs={"use_distributed_optimizer": True}),
    "tp2pp2": dict(world_size=4, tp=2, pp=2),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_tp1(layout, reference, batch):
    spec = dict(LAYOUTS[layout])
    kwargs = spec.pop("kwargs", {})
    got = _merge(run_distributed(train_step_worker, args=(batch,), kwargs=kwargs, timeout=TIMEOUT, **spec))

    torch.testing.assert_close(got["logp"], reference["logp"], rtol=1e-5, atol=1e-5)
    for key, ref in reference["metrics"].items():
        assert got["metrics"][key] == pytest.approx(ref, rel=1e-5, abs=1e-7), f"metric {key}"
    _assert_close_tensors(got["params_before"], reference["params_before"], "initial weights", rtol=0.0)
    if not kwargs.get("use_distributed_optimizer"):
        _assert_close_tensors(got["grads"], reference["grads"], "grad")
    assert got["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
    # Adam's first step is lr * g / (|g| + eps): for |g| ~ eps, fp32 noise in g (allowed above) moves the
    # update by a fair fraction of lr. So weights are compared to 1% of one step; a wrong or missing update
    # is off by ~lr (and the gradients are already checked to rtol 1e-5).
    _assert_close_tensors(got["params_after"], reference["params_after"], "weights after Adam", atol=0.01 * LR)
