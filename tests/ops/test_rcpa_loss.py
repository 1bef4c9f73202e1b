"""rcpa_loss_from_logits against the algo reference rcpa_loss applied to float64 log-probabilities:
value, every metric, and the gradient w.r.t. the logits."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_rcpa.algo.config import LossConfig
from megatron_rcpa.algo.loss import GlobalCounts, count_tokens, rcpa_loss
from megatron_rcpa.algo.registry import AGGREGATIONS, KL_ESTIMATORS, register_kl_estimator
from megatron_rcpa.ops import rcpa_loss_from_logits

from ._reference import ref_logprob64, rel_err, require_tp2, tol, worker_device

pytestmark = pytest.mark.triton


def make_batch(seed=0, s=16, b=4, v=499, dtype=torch.float32, device="cpu", group=2, imitation=True):
    """Megatron-layout [S, B, V] logits of B rollouts (``group`` per prompt): a prompt, a constrained
    prefix shared by the group (imitation set), generated tokens, then padding."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(s, b, v, generator=g) * 2).to(dtype)
    targets = torch.randint(0, v, (s, b), generator=g)
    pos = torch.arange(s)[:, None].expand(s, b)
    prompt_len, prefix = 3, torch.tensor([2, 2, 0, 0, 3, 3, 1, 1])[:b]
    end = torch.tensor([16, 12, 15, 9, 14, 16, 11, 13])[:b].clamp(max=s)
    cons = (pos >= prompt_len) & (pos < prompt_len + prefix[None]) if imitation else torch.zeros(s, b, dtype=bool)
    gen = (pos >= prompt_len + prefix[None]) & (pos < end[None])
    seq_ids = torch.arange(b)[None].expand(s, b) * 5 + 11  # arbitrary ids
    prompt_ids = (torch.arange(b) // group)[None].expand(s, b) * 3 - 7
    with torch.no_grad():
        lp, _ = ref_logprob64(logits, targets)
    old = (lp + 0.35 * torch.randn(s, b, generator=g, dtype=torch.float64)).float()  # ratios on both sides
    ref = (lp + 0.3 * torch.randn(s, b, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(b, generator=g)[None].expand(s, b)
    to = lambda t: t.to(device)
    return dict(logits=to(logits), targets=to(targets), old_logp=to(old), advantages=to(adv), gen_mask=to(gen),
                ref_logp=to(ref), constrained_mask=to(cons), seq_ids=to(seq_ids), prompt_ids=to(prompt_ids))


def reference(batch, config, *, lambda_t, temperature=1.0, vocab_size=None, counts=None, logits=None):
    """rcpa_loss on float64 log-probabilities/entropies; returns (loss, metrics, grad of the logits)."""
    x = (batch["logits"] if logits is None else logits).detach().to(torch.float64).requires_grad_()
    lp, h = ref_logprob64(x, batch["targets"], None, temperature, vocab_size)
    loss, metrics = rcpa_loss(lp, batch["old_logp"], batch["advantages"], batch["gen_mask"], config=config,
                              ref_logp=batch["ref_logp"], entropy=h, constrained_mask=batch["constrained_mask"],
                              seq_ids=batch["seq_ids"], prompt_ids=batch["prompt_ids"], lambda_t=lambda_t,
                              counts=counts)
    loss.backward()
    return loss.detach(), metrics, x.grad


def fused(batch, config, *, lambda_t, temperature=1.0, vocab_size=None, counts=None, inplace=False,
          impl="triton", scale=1.0, logits=None):
    leaf = (batch["logits"] if logits is None else logits).detach().clone().requires_grad_()
    x = leaf * 1  # the logits are an activation in a model
    loss, metrics = rcpa_loss_from_logits(
        x, batch["targets"], batch["old_logp"], batch["advantages"], batch["gen_mask"], config=config,
        ref_logp=batch["ref_logp"], constrained_mask=batch["constrained_mask"], seq_ids=batch["seq_ids"],
        prompt_ids=batch["prompt_ids"], lambda_t=lambda_t, counts=counts, temperature=temperature,
        vocab_size=vocab_size, inplace_backward=inplace, impl=impl)
    (loss * scale).backward()
    return loss.detach(), metrics, leaf.grad


def assert_match(got, want, dtype=torch.float32, scale=1.0):
    loss, metrics, grad = got
    r_loss, r_metrics, r_grad = want
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert rel_err(loss, r_loss) <= 1e-5, (float(loss), float(r_loss))
    assert set(metrics) == set(r_metrics), (sorted(metrics), sorted(r_metrics))
    for k, v in r_metrics.items():
        assert abs(float(metrics[k]) - float(v)) <= 1e-5 * max(1.0, abs(float(v))), (k, float(metrics[k]), float(v))
    assert grad.dtype == dtype
    assert rel_err(grad, r_grad * scale) <= tol(dtype), rel_err(grad, r_grad * scale)


CONFIGS = [  # (config, lambda_t): every aggregation x ratio level; k1/k2/k3, dual clip, entropy, imitation
    (LossConfig(), 0.0),
    (LossConfig(ratio_level="sequence", beta=0.1, kl_type="k1", dual_clip=3.0, alpha=0.01), 0.7),
    (LossConfig(aggregation="seq_mean_token_mean", beta=0.05, kl_type="k2"), 1.0),
    (LossConfig(aggregation="seq_mean_token_mean", ratio_level="sequence", beta=0.2, kl_type="k3",
                dual_clip=2.5, alpha=0.02), 0.0),
    (LossConfig(aggregation="seq_mean_token_sum_norm", max_response_length=20, beta=0.1, dual_clip=3.0,
                alpha=0.01), 0.4),
    (LossConfig(aggregation="seq_mean_token_sum_norm", max_response_length=20, ratio_level="sequence",
                kl_type="k1"), 0.4),
    (LossConfig(beta=0.3, kl_type="k2", dual_clip=1.5, alpha=0.05, eps_low=0.1, eps_high=0.15), 0.5),
]


def test_configs_cover_every_registered_kl_estimator_and_aggregation():
    """The reference comparison below runs every registered variant (it always passes ref_logp, so the
    KL branch runs in every config): registering one means adding it to CONFIGS."""
    assert {c.kl_type for c, _ in CONFIGS} == set(KL_ESTIMATORS.names())
    assert {c.aggregation for c, _ in CONFIGS} == set(AGGREGATIONS.names())


@pytest.mark.parametrize("config,lambda_t", CONFIGS, ids=[f"c{i}" for i in range(len(CONFIGS))])
def test_matches_reference(config, lambda_t, device):
    batch = make_batch(seed=1, device=device)
    assert_match(fused(batch, config, lambda_t=lambda_t), reference(batch, config, lambda_t=lambda_t))


def test_clipping_and_dual_clip_are_exercised(device):
    """The test data really reaches both clip sides and the dual clip (else the tests above prove little)."""
    batch = make_batch(seed=1, device=device)
    cfg = LossConfig(dual_clip=1.5, eps_low=0.1, eps_high=0.15)
    _, m, _ = fused(batch, cfg, lambda_t=0.0)
    assert float(m["clip_frac_low"]) > 0 and float(m["clip_frac_high"]) > 0 and float(m["dual_clip_frac"]) > 0


def test_temperature_padded_vocab_and_several_blocks(device, small_blocks):
    batch = make_batch(seed=2, device=device)
    batch["targets"][5, 1] = 497  # a padded id on a generated position: masked, zero gradient
    cfg = LossConfig(ratio_level="sequence", beta=0.1, alpha=0.03, dual_clip=2.0)
    kw = dict(lambda_t=0.3, temperature=0.8, vocab_size=490)
    assert_match(fused(batch, cfg, **kw), reference(batch, cfg, **kw))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits(dtype, device):
    batch = make_batch(seed=3, dtype=dtype, device=device)
    cfg = LossConfig(beta=0.1, alpha=0.01)
    assert_match(fused(batch, cfg, lambda_t=0.5), reference(batch, cfg, lambda_t=0.5), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(dtype, device):
    batch = make_batch(seed=4, dtype=dtype, device=device)
    cfg = LossConfig(aggregation="seq_mean_token_mean", alpha=0.01)
    assert_match(fused(batch, cfg, lambda_t=0.5, inplace=True), reference(batch, cfg, lambda_t=0.5), dtype=dtype)


def test_noncontiguous_logits_and_scaled_loss(device):
    batch = make_batch(seed=5, device=device)
    logits = batch["logits"].transpose(0, 1).contiguous().transpose(0, 1)  # [S, B, V] view of [B, S, V]
    assert not logits.is_contiguous()
    cfg = LossConfig(ratio_level="sequence", beta=0.05)
    got = fused(batch, cfg, lambda_t=0.2, scale=2.5, logits=logits)
    assert_match(got, reference(batch, cfg, lambda_t=0.2, logits=logits), scale=2.5)


def test_global_counts(device):
    """With counts from the whole batch (here: twice this micro-batch) the loss is normalised by them."""
    batch = make_batch(seed=6, device=device)
    local = count_tokens(batch["gen_mask"], batch["constrained_mask"], batch["seq_ids"], batch["prompt_ids"])
    counts = local + local
    assert isinstance(counts, GlobalCounts)
    for cfg in (LossConfig(), LossConfig(aggregation="seq_mean_token_mean", ratio_level="sequence")):
        got = fused(batch, cfg, lambda_t=0.5, counts=counts)
        assert_match(got, reference(batch, cfg, lambda_t=0.5, counts=counts))
        half = fused(batch, cfg, lambda_t=0.5)
        assert torch.allclose(got[0] * 2, half[0], rtol=1e-5)


def test_no_imitation_and_no_ref(device):
    batch = make_batch(seed=7, device=device, imitation=False)
    batch["constrained_mask"] = None
    batch["ref_logp"] = None
    cfg = LossConfig(alpha=0.02, dual_clip=2.0)
    assert_match(fused(batch, cfg, lambda_t=0.0), reference(batch, cfg, lambda_t=0.0))


def test_torch_impl_is_the_reference(device):
    batch = make_batch(seed=8, device=device)
    cfg = LossConfig(beta=0.1, kl_type="k2", alpha=0.01)
    loss, metrics, grad = fused(batch, cfg, lambda_t=0.5, impl="torch")
    assert_match((loss.float(), metrics, grad), reference(batch, cfg, lambda_t=0.5))


def test_errors(device):
    batch = make_batch(seed=9, device=device)
    base = dict(config=LossConfig(), seq_ids=batch["seq_ids"])
    args = (batch["logits"], batch["targets"], batch["old_logp"], batch["advantages"], batch["gen_mask"])
    with pytest.raises(ValueError, match="overlap"):
        rcpa_loss_from_logits(*args, constrained_mask=batch["gen_mask"], **base)
    with pytest.raises(ValueError, match="needs ref_logp"):
        rcpa_loss_from_logits(*args, config=LossConfig(beta=0.1))
    with pytest.raises(ValueError, match="needs seq_ids"):
        rcpa_loss_from_logits(*args, config=LossConfig(ratio_level="sequence"))
    with pytest.raises(ValueError, match="LossConfig"):
        rcpa_loss_from_logits(*args, config={"beta": 0.0})
    with pytest.raises(ValueError, match="old_logp has shape"):
        rcpa_loss_from_logits(batch["logits"], batch["targets"], batch["old_logp"][:3], batch["advantages"],
                              batch["gen_mask"], **base)
    with pytest.raises(ValueError, match="lambda_t"):
        rcpa_loss_from_logits(*args, lambda_t=-1.0, **base)


def test_reference_only_kl_estimator_is_refused_by_the_kernel_before_any_launch(device):
    batch = make_batch(seed=9, device=device)
    args = (batch["logits"], batch["targets"], batch["old_logp"], batch["advantages"], batch["gen_mask"])

    @register_kl_estimator("test_abs", kernel_id=None)
    def _kl_abs(logp, ref_logp):
        return (ref_logp - logp).abs()

    try:
        cfg = LossConfig(kl_type="test_abs", beta=0.1)
        logp = torch.randn(5, dtype=torch.float64)
        _, m = rcpa_loss(logp, logp, torch.ones(5), torch.ones(5, dtype=torch.bool), config=cfg, ref_logp=logp - 0.5)
        assert m["kl_ref"].item() == pytest.approx(0.5)  # the reference runs it
        with pytest.raises(ValueError, match="rcpa.loss.kl_type = 'test_abs': this KL estimator has no branch in "
                                             "ops.rcpa_loss._token_kernel"):
            rcpa_loss_from_logits(*args, config=cfg, ref_logp=batch["ref_logp"])
    finally:
        KL_ESTIMATORS.remove("test_abs")


def _tp_worker():
    """Inside run_distributed(tp=2): the sharded fused loss equals the float64 reference on the full logits."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    os.environ["MEGATRON_RCPA_BLOCK_V"] = "64"
    group = ps.get_tensor_model_parallel_group()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    v_local = 125
    vocab_size = 2 * v_local - 4
    batch = make_batch(seed=10, v=world * v_local, device=worker_device())
    batch["targets"] = batch["targets"].clamp(max=vocab_size - 1)
    batch["targets"][4, 0], batch["targets"][5, 0] = v_local - 1, v_local  # shard boundary
    cfg = LossConfig(ratio_level="sequence", beta=0.1, kl_type="k1", dual_clip=3.0, alpha=0.01)
    kw = dict(lambda_t=0.7, temperature=0.9, vocab_size=vocab_size)
    r_loss, r_metrics, r_grad = reference(batch, cfg, **kw)
    out = {}
    for impl, inplace in (("triton", False), ("triton", True), ("torch", False)):
        shard = batch["logits"][..., rank * v_local:(rank + 1) * v_local].clone().requires_grad_()
        x = shard * 1
        loss, metrics = rcpa_loss_from_logits(
            x, batch["targets"], batch["old_logp"], batch["advantages"], batch["gen_mask"], config=cfg,
            ref_logp=batch["ref_logp"], constrained_mask=batch["constrained_mask"], seq_ids=batch["seq_ids"],
            prompt_ids=batch["prompt_ids"], tp_group=group, inplace_backward=inplace, impl=impl, **kw)
        loss.backward()
        out[f"{impl}{inplace}"] = {
            "loss": rel_err(loss, r_loss),
            "metrics": max(abs(float(metrics[k]) - float(v)) / max(1.0, abs(float(v))) for k, v in r_metrics.items()),
            "grad": rel_err(shard.grad, r_grad[..., rank * v_local:(rank + 1) * v_local]),
        }
    return out


@pytest.mark.multiproc
def test_tensor_parallel_two_ranks():
    require_tp2()
    from megatron_rcpa.testing.launcher import run_distributed

    for rank, res in enumerate(run_distributed(_tp_worker, world_size=2, tp=2, timeout=240)):
        for key, r in res.items():
            assert r["loss"] <= 1e-5 and r["metrics"] <= 1e-5 and r["grad"] <= 1e-5, (rank, key, r)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync detection needs CUDA")
def test_no_host_sync_with_global_counts():
    """With counts given, token-level ratio and no imitation set, forward and backward never sync."""
    batch = make_batch(seed=11, device="cuda", imitation=False)
    counts = count_tokens(batch["gen_mask"])
    x = batch["logits"].clone().requires_grad_()
    cfg = LossConfig(beta=0.1, alpha=0.01, dual_clip=3.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = rcpa_loss_from_logits(x, batch["targets"], batch["old_logp"], batch["advantages"],
                                        batch["gen_mask"], config=cfg, ref_logp=batch["ref_logp"], counts=counts)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None
