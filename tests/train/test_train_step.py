"""The training path end to end on a real Megatron-Core GPTModel: rollouts packed into fixed-shape
micro-batches, old-policy log-probs from a forward-only schedule pass, then the fused RCPA loss (Triton
kernels; interpreter on CPU) through megatron's schedule, DDP and Adam. TP=2, PP=2 and DP=2 must give the
TP=1 loss, metrics and updated weights, and the Triton path must equal the plain-torch path."""

from __future__ import annotations

import pytest
import torch

from megatron_rcpa.rollout.batch import Rollout, pack_rollouts
from megatron_rcpa.testing import run_distributed

pytestmark = [pytest.mark.multiproc, pytest.mark.megatron, pytest.mark.triton]

VOCAB, G, PROMPTS = 250, 2, 4  # vocab padded to 256 at TP 1/2; 4 prompts x 2 rollouts
LR, TIMEOUT = 1e-3, 240.0


def make_rollouts():
    g = torch.Generator().manual_seed(0)
    out, adv = [], []
    for p in range(PROMPTS):
        prompt = torch.randint(0, VOCAB, (3 + p % 2,), generator=g).tolist()
        prefix = torch.randint(0, VOCAB, (p % 3,), generator=g).tolist()  # prompt 0 and 3: no forced prefix
        for j in range(G):
            gen = torch.randint(0, VOCAB, (4 + (p + j) % 3,), generator=g).tolist()
            # rollout log-probs near the tiny model's (uniform over 256) so ratios straddle the clip range
            lp = (-5.545 + 0.3 * torch.randn(len(gen), generator=g)).tolist()
            out.append(Rollout(p, prompt, prefix, gen, lp))
            adv.append(float(torch.randn((), generator=g)))
    return out, adv


def step_worker(impl: str) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_rcpa.algo.config import LossConfig
    from megatron_rcpa.testing import gather_global_tensors, rank_info, tiny_gpt_model, tiny_transformer_config
    from megatron_rcpa.train.step import StepConfig, compute_logprobs, split_micro_batches, train_step

    info = rank_info()
    rollouts, adv = make_rollouts()
    full = pack_rollouts(rollouts, adv, pad_id=0, pad_to_multiple=4)
    per_rank = full.num_rollouts // info.dp_size
    batch = full.select(range(info.dp_rank * per_rank, (info.dp_rank + 1) * per_rank))
    micro = split_micro_batches(batch, micro_batch_size=G, group_size=G)

    config = tiny_transformer_config(num_query_groups=2, add_qkv_bias=True, normalization="RMSNorm",
                                     gated_linear_unit=True, activation_func=torch.nn.functional.silu)
    model = tiny_gpt_model(config, vocab_size=VOCAB, max_seq=32)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=LR, clip_grad=1.0, bf16=False,
                                                 params_dtype=torch.float32), [ddp])
    config.finalize_model_grads_func = finalize_model_grads
    cfg = StepConfig(loss=LossConfig(beta=0.05, dual_clip=3.0, aggregation="seq_mean_token_mean"), lambda_t=0.5,
                     temperature=0.9, vocab_size=VOCAB, impl=impl)
    ref = compute_logprobs(ddp, micro, cfg)  # the initial policy, nudged so that the KL term is not 0
    if ref is not None:  # the same noise per rollout in every layout: drawn for the full batch, then sliced
        noise = 0.2 * torch.randn(full.tokens.shape, generator=torch.Generator().manual_seed(7))
        noise = noise[info.dp_rank * per_rank:(info.dp_rank + 1) * per_rank].split(G)
        ref = [r + e * (m.gen_mask | m.constrained_mask) for r, e, m in zip(ref, noise, micro)]
    old = [torch.tensor(m.rollout_logp) for m in micro] if ref is not None else None
    metrics = train_step(ddp, opt, micro, old, cfg, ref_logp=ref)
    out = {"metrics": metrics, "params": gather_global_tensors(ddp), "grads": gather_global_tensors(ddp, "grad"),
           "pp_last": ps.is_pipeline_last_stage()}
    if ref is not None:
        out["ref_logp"] = torch.cat(ref)
    return out


def _merge(results):
    params, grads = {}, {}
    for r in results:
        for k, v in r["params"].items():
            params.setdefault(k, v)
        for k, v in r["grads"].items():
            grads.setdefault(k, v)
    last = [r for r in results if r["pp_last"]]
    assert all(r["metrics"] == results[0]["metrics"] for r in results), "ranks disagree on the metrics"
    return {"metrics": results[0]["metrics"], "params": params, "grads": grads, "ref_logp": last[0]["ref_logp"]}


@pytest.fixture(scope="module")
def reference():
    return _merge(run_distributed(step_worker, world_size=1, args=("torch",), timeout=TIMEOUT))


def test_reference_is_meaningful(reference):
    m = reference["metrics"]
    assert m["update_ok"] == 1.0 and m["grad_norm"] > 0
    assert m["imit_nll"] > 0 and m["kl_ref"] > 0 and m["clip_frac_low"] + m["clip_frac_high"] > 0
    assert len(reference["grads"]) == len(reference["params"]) > 20
    assert all(g.abs().max() > 0 for g in reference["grads"].values())
    assert m["entropy"] == pytest.approx(5.545, abs=0.1)  # ~uniform over the 250 real tokens (log 250 = 5.52)


@pytest.mark.parametrize("layout, impl", [
    ("tp1", "triton"), ("tp2", "triton"), ("pp2", "triton"), ("dp2", "triton"), ("tp2", "torch"),
])
def test_layouts_and_kernels_match_the_reference(layout, impl, reference):
    spec = {"tp1": dict(world_size=1), "tp2": dict(world_size=2, tp=2), "pp2": dict(world_size=2, pp=2),
            "dp2": dict(world_size=2)}[layout]
    got = _merge(run_distributed(step_worker, args=(impl,), timeout=TIMEOUT, **spec))
    for k, v in reference["metrics"].items():
        assert got["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    if layout != "dp2":
        torch.testing.assert_close(got["ref_logp"], reference["ref_logp"], rtol=1e-5, atol=1e-5)
    assert set(got["params"]) == set(reference["params"])
    assert set(got["grads"]) == set(reference["grads"])
    for k, v in reference["grads"].items():  # elements ~0 by cancellation carry the error of the large terms
        tol = 1e-5 * float(v.abs().max()) + 1e-12
        torch.testing.assert_close(got["grads"][k], v, rtol=1e-5, atol=tol, msg=lambda m, k=k: f"grad {k}: {m}")
    # Adam's first step is lr * g / (|g| + eps): for a gradient element near eps the step amplifies rounding,
    # so updated weights are compared to 5% of one step (lr) absolute; the gradients above are the tight check.
    for k, v in reference["params"].items():
        torch.testing.assert_close(got["params"][k], v, rtol=1e-5, atol=0.05 * LR, msg=lambda m, k=k: f"{k}: {m}")


def test_micro_batches_may_split_groups_but_must_divide_the_batch():
    from megatron_rcpa.train.step import split_micro_batches

    rollouts, adv = make_rollouts()
    batch = pack_rollouts(rollouts, adv, pad_id=0)
    with pytest.raises(ValueError, match="8 rollouts per rank do not split into micro-batches of 3"):
        split_micro_batches(batch, 3, 2)
    assert [m.num_rollouts for m in split_micro_batches(batch, 4, 2)] == [4, 4]
    assert [m.num_rollouts for m in split_micro_batches(batch, 1)] == [1] * 8  # groups of 2 split in halves
