"""The RCPA loss: hand-computed cases for every aggregation, ratio level, KL type, dual clip, entropy and
imitation term, global normalisation, and the gradient property (RCPA_SPEC section 4)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rcpa.algo import AGGREGATIONS, KL_ESTIMATORS, GlobalCounts, LossConfig, count_tokens, rcpa_loss

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def three_tokens():
    """Ratios [1, 1.5, 0.5], advantages [1, 1, -1]; tokens 0-1 are rollout 0, token 2 rollout 1."""
    old = t([-1.0, -2.0, -0.5])
    logp = (old + t([0.0, math.log(1.5), math.log(0.5)])).requires_grad_()
    return logp, old, t([1.0, 1.0, -1.0]), torch.ones(3, dtype=torch.bool), torch.tensor([0, 0, 1])


def test_token_mean_clip_higher_by_hand():
    logp, old, adv, gen, sids = three_tokens()
    loss, m = rcpa_loss(logp, old, adv, gen, config=LossConfig(), seq_ids=sids)
    # token 0 unclipped: -1; token 1: A>0, r=1.5 > 1.28 -> -1.28; token 2: A<0, r=0.5 < 0.8 -> +0.8
    assert loss.item() == pytest.approx((-1 - 1.28 + 0.8) / 3, abs=1e-12)
    assert m["clip_frac_low"].item() == pytest.approx(1 / 3)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 3)
    assert m["ratio_mean"].item() == pytest.approx(1.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, t([-1 / 3, 0.0, 0.0]))  # clipped tokens carry no gradient


AGG_BY_HAND = [  # one case per registered aggregation: three_tokens(), max_response_length = 4
    ("token_mean", (-1 - 1.28 + 0.8) / 3),
    ("seq_mean_token_mean", ((-1 - 1.28) / 2 + 0.8) / 2),
    ("seq_mean_token_sum_norm", ((-1 - 1.28) / 4 + 0.8 / 4) / 2),
]


def test_every_aggregation_has_a_case_by_hand():
    assert [name for name, _ in AGG_BY_HAND] == list(AGGREGATIONS.names())


@pytest.mark.parametrize("aggregation, expected", AGG_BY_HAND)
def test_aggregations_by_hand(aggregation, expected):
    logp, old, adv, gen, sids = three_tokens()
    cfg = LossConfig(aggregation=aggregation, max_response_length=4)
    loss, _ = rcpa_loss(logp, old, adv, gen, config=cfg, seq_ids=sids)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_sequence_level_ratio_by_hand():
    logp, old, adv, gen, sids = three_tokens()
    loss, m = rcpa_loss(logp, old, adv, gen, config=LossConfig(ratio_level="sequence"), seq_ids=sids)
    s0 = math.sqrt(1.5)  # geometric mean of [1, 1.5]: inside [0.8, 1.28]
    assert loss.item() == pytest.approx((-2 * s0 + 0.8) / 3, abs=1e-12)
    loss.backward()
    # d(-s0)/dlogp_t = -s0 * 1/2 for both tokens of rollout 0, each weighted 1/3; rollout 1 is clipped.
    torch.testing.assert_close(logp.grad, t([-s0 / 3, -s0 / 3, 0.0]))


def test_dual_clip_by_hand():
    old = t([0.0, 0.0])
    logp = t([math.log(4.0), math.log(2.0)]).requires_grad_()
    adv, gen = t([-1.0, -1.0]), torch.ones(2, dtype=torch.bool)
    loss, m = rcpa_loss(logp, old, adv, gen, config=LossConfig(dual_clip=3.0))
    # r=4: max(4, 1.28) = 4 capped to 3 (no grad); r=2: max(2, 1.28) = 2 below the cap
    assert loss.item() == pytest.approx((3.0 + 2.0) / 2)
    assert m["dual_clip_frac"].item() == pytest.approx(0.5)
    loss.backward()
    torch.testing.assert_close(logp.grad, t([0.0, 2.0 / 2]))
    loss_nodual, _ = rcpa_loss(logp, old, adv, gen, config=LossConfig())
    assert loss_nodual.item() == pytest.approx((4.0 + 2.0) / 2)


KL_BY_HAND = [  # one case per registered KL estimator: logp = -1, ref = -1.5
    ("k1", 0.5, 1.0),
    ("k2", 0.125, 0.5),
    ("k3", math.exp(-0.5) - 1 + 0.5, 1 - math.exp(-0.5)),
]
# d KL / d logp of each registered estimator, for the analytic-gradient property below
KL_GRAD = {"k1": lambda logp, ref: torch.ones_like(logp), "k2": lambda logp, ref: logp - ref,
           "k3": lambda logp, ref: 1 - torch.exp(ref - logp)}


def test_every_kl_estimator_has_a_case_by_hand_and_a_gradient():
    assert [name for name, _, _ in KL_BY_HAND] == list(KL_ESTIMATORS.names()) == list(KL_GRAD)


@pytest.mark.parametrize("kl_type, value, grad", KL_BY_HAND)
def test_kl_types_by_hand(kl_type, value, grad):
    logp = t([-1.0]).requires_grad_()
    ref = t([-1.5])
    cfg = LossConfig(beta=0.1, kl_type=kl_type)
    loss, m = rcpa_loss(logp, logp.detach(), t([0.0]), torch.ones(1, dtype=torch.bool), config=cfg, ref_logp=ref)
    assert m["kl_ref"].item() == pytest.approx(value)
    assert loss.item() == pytest.approx(0.1 * value)
    loss.backward()
    assert logp.grad.item() == pytest.approx(0.1 * grad)


def test_entropy_bonus_and_missing_inputs():
    logp = t([-1.0, -2.0])
    gen = torch.ones(2, dtype=torch.bool)
    ent = t([2.0, 1.0]).requires_grad_()
    loss, m = rcpa_loss(logp, logp, t([0.0, 0.0]), gen, config=LossConfig(alpha=0.01), entropy=ent)
    assert loss.item() == pytest.approx(-0.01 * 1.5)
    assert m["entropy"].item() == pytest.approx(1.5)
    loss.backward()
    torch.testing.assert_close(ent.grad, t([-0.005, -0.005]))
    with pytest.raises(ValueError, match="alpha = 0.01 > 0 needs entropy"):
        rcpa_loss(logp, logp, t([0.0, 0.0]), gen, config=LossConfig(alpha=0.01))
    with pytest.raises(ValueError, match="beta = 0.1 > 0 needs ref_logp"):
        rcpa_loss(logp, logp, t([0.0, 0.0]), gen, config=LossConfig(beta=0.1))
    with pytest.raises(ValueError, match="old_logp has shape \\(3,\\)"):
        rcpa_loss(logp, t([0.0, 0, 0]), t([0.0, 0.0]), gen, config=LossConfig())


def imitation_batch():
    """Prompt 0: rollouts 0 and 1 share a 2-token prefix (logp -1, -2) and generate 1 token each;
    prompt 1: rollout 2 has a 1-token prefix (logp -3) and generates 1 token."""
    logp = t([-1.0, -2.0, -0.1, -1.0, -2.0, -0.2, -3.0, -0.3]).requires_grad_()
    cons = torch.tensor([1, 1, 0, 1, 1, 0, 1, 0], dtype=torch.bool)
    sids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    pids = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    return logp, ~cons, cons, sids, pids


def test_imitation_counts_shared_prefix_once():
    logp, gen, cons, sids, pids = imitation_batch()
    counts = count_tokens(gen, cons, sids, pids)
    assert (counts.num_gen_tokens, counts.num_seqs, counts.num_imit_tokens) == (3.0, 3.0, 3.0)
    loss, m = rcpa_loss(logp, logp.detach(), torch.zeros(8, dtype=D), gen, config=LossConfig(),
                        constrained_mask=cons, seq_ids=sids, prompt_ids=pids, lambda_t=0.5)
    assert m["imit_nll"].item() == pytest.approx((1 + 2 + 3) / 3)  # the prompt-0 prefix counted once
    assert loss.item() == pytest.approx(0.5 * 2.0)
    loss.backward()
    half = -0.5 / 3 / 2  # lambda / num_imit_tokens, split over the two rollouts sharing the prefix
    torch.testing.assert_close(logp.grad, t([half, half, 0, half, half, 0, -0.5 / 3, 0]))
    # without prompt ids every rollout's prefix counts
    loss, m = rcpa_loss(logp, logp.detach(), torch.zeros(8, dtype=D), gen, config=LossConfig(),
                        constrained_mask=cons, seq_ids=sids, lambda_t=0.5)
    assert m["imit_nll"].item() == pytest.approx((1 + 2 + 1 + 2 + 3) / 5)
    with pytest.raises(ValueError, match="overlap"):
        rcpa_loss(logp, logp, torch.zeros(8, dtype=D), gen | cons, config=LossConfig(), constrained_mask=cons)


@pytest.mark.parametrize("aggregation", AGGREGATIONS.names())
def test_micro_batches_with_global_counts_sum_to_the_full_batch(aggregation):
    g = torch.Generator().manual_seed(0)
    s, b = 6, 4  # Megatron layout [S, B]; each column one rollout, two prompts of two rollouts
    logp = -torch.rand(s, b, generator=g, dtype=D)
    old = logp + 0.3 * torch.randn(s, b, generator=g, dtype=D)
    ref = logp + 0.3 * torch.randn(s, b, generator=g, dtype=D)
    ent = torch.rand(s, b, generator=g, dtype=D)
    adv = torch.randn(b, generator=g, dtype=D).expand(s, b)
    cons = torch.zeros(s, b, dtype=torch.bool)
    cons[:2] = True
    gen = ~cons
    gen[5, 1] = False  # a shorter rollout
    sids = torch.arange(b).expand(s, b)
    pids = (torch.arange(b) // 2).expand(s, b)
    cfg = LossConfig(aggregation=aggregation, max_response_length=8, beta=0.05, alpha=0.01, dual_clip=3.0)
    kw = dict(config=cfg, lambda_t=0.7)
    full, mfull = rcpa_loss(logp, old, adv, gen, ref_logp=ref, entropy=ent, constrained_mask=cons, seq_ids=sids,
                            prompt_ids=pids, **kw)
    halves = [slice(0, 2), slice(2, 4)]  # whole prompts per micro-batch
    counts = sum((count_tokens(gen[:, h], cons[:, h], sids[:, h], pids[:, h]) for h in halves),
                 GlobalCounts(0.0, 0.0, 0.0))
    parts = [rcpa_loss(logp[:, h], old[:, h], adv[:, h], gen[:, h], ref_logp=ref[:, h], entropy=ent[:, h],
                       constrained_mask=cons[:, h], seq_ids=sids[:, h], prompt_ids=pids[:, h], counts=counts, **kw)
             for h in halves]
    assert (parts[0][0] + parts[1][0]).item() == pytest.approx(full.item(), abs=1e-12)
    for key in mfull:
        assert (parts[0][1][key] + parts[1][1][key]).item() == pytest.approx(mfull[key].item(), abs=1e-12), key


def test_masked_positions_may_hold_garbage():
    logp = t([-1.0, -float("inf"), float("nan")]).requires_grad_()
    old = t([-1.2, 0.0, 0.0])
    gen = torch.tensor([True, False, False])
    loss, _ = rcpa_loss(logp, old, t([1.0, 5.0, 5.0]), gen, config=LossConfig(beta=0.1), ref_logp=t([-1.0, 9, 9]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert logp.grad[1:].abs().max().item() == 0.0


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 12),
    seed=st.integers(0, 10_000),
    kl_type=st.sampled_from(KL_ESTIMATORS.names()),
    dual=st.sampled_from([None, 2.5]),
    lam=st.floats(0, 2),
)
def test_gradient_matches_the_analytic_one(n, seed, kl_type, dual, lam):
    """Token-level ratio, token_mean: dL/dlogp_t = w*(dpg_t + beta*dkl_t) - lambda*(imitation weight)."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, generator=g, dtype=D) * 3
    old = logp + 0.5 * torch.randn(n, generator=g, dtype=D)
    ref = logp + 0.5 * torch.randn(n, generator=g, dtype=D)
    adv = torch.randn(n, generator=g, dtype=D)
    cons = torch.rand(n, generator=g) < 0.3
    gen = ~cons
    beta, el, eh = 0.2, 0.2, 0.28
    cfg = LossConfig(beta=beta, kl_type=kl_type, dual_clip=dual, eps_low=el, eps_high=eh)
    x = logp.clone().requires_grad_()
    loss, _ = rcpa_loss(x, old, adv, gen, config=cfg, ref_logp=ref, constrained_mask=cons, lambda_t=lam)
    loss.backward()

    r = torch.exp(logp - old)
    unclipped = -adv * r
    clipped = -adv * r.clamp(1 - el, 1 + eh)
    dpg = torch.where(unclipped >= clipped, -adv * r, torch.zeros_like(r))
    if dual is not None:
        dpg = torch.where((adv < 0) & (torch.maximum(unclipped, clipped) > -adv * dual), torch.zeros_like(r), dpg)
    dkl = KL_GRAD[kl_type](logp, ref)
    ngen, ncons = max(int(gen.sum()), 1), max(int(cons.sum()), 1)
    expected = torch.where(gen, (dpg + beta * dkl) / ngen, -lam * cons.to(D) / ncons)
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-12)
