"""The variant registries: a config string selects an entry, validation reads the keys, errors name the
config key and the registered names, and a new entry is one registration."""

import pytest
import torch

from megatron_rcpa.algo import AGGREGATIONS, KL_ESTIMATORS, GlobalCounts, LossConfig, kl_penalty, rcpa_loss
from megatron_rcpa.algo.config import RCPAConfig
from megatron_rcpa.algo.registry import (
    AGG_PER_TOKEN,
    AGG_UNIFORM,
    Aggregation,
    KLEstimator,
    Registry,
    register_aggregation,
)


def test_the_builtin_names_in_the_spec_order():
    from megatron_rcpa.algo import ADVANTAGE_ESTIMATORS

    assert ADVANTAGE_ESTIMATORS.names() == ("grpo", "dr_grpo", "rloo")
    assert KL_ESTIMATORS.names() == ("k1", "k2", "k3")
    assert AGGREGATIONS.names() == ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(ValueError, match="rcpa.loss.kl_type = 'k4': unknown KL estimator; expected one of 'k1', "
                                         "'k2', 'k3'"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")
    with pytest.raises(ValueError, match="aggregation = 'sum' is out of range: expected one of 'token_mean', "
                                         "'seq_mean_token_mean', 'seq_mean_token_sum_norm'"):
        RCPAConfig.from_dict({"loss": {"aggregation": "sum"}})
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        AGGREGATIONS.remove("sum")


def test_bad_registrations_are_refused():
    reg = Registry("thing", "x.thing")
    reg.add(KLEstimator("a", abs, 1))
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        reg.add(KLEstimator("a", abs, 2))
    with pytest.raises(ValueError, match="thing 'b': kernel_id = 1 is already the branch of 'a'"):
        reg.add(KLEstimator("b", abs, 1))
    with pytest.raises(ValueError, match="kernel_id = -1, expected an integer >= 0 or None"):
        reg.add(KLEstimator("c", abs, -1))
    with pytest.raises(ValueError, match="non-empty string"):
        reg.add(KLEstimator("", abs, None))
    reg.add(KLEstimator("d", abs, None))
    assert reg.names() == ("a", "d") and reg.kernel_ids() == (1,) and "d" in reg and len(reg) == 2
    with pytest.raises(ValueError, match="x.thing = 'd': this thing has no branch in K"):
        reg.kernel_id("d", "K")
    with pytest.raises(ValueError, match="expected AGG_UNIFORM \\(0\\) or AGG_PER_TOKEN \\(1\\)"):
        Aggregation("e", abs, None)
    with pytest.raises(ValueError, match="AGG_UNIFORM needs a kernel_scale"):
        Aggregation("e", abs, AGG_UNIFORM)


def test_a_new_aggregation_is_one_registration():
    """seq_sum: each rollout's token sum, averaged over the rollouts (uniform weight 1/num_seqs)."""

    @register_aggregation("test_seq_sum", kernel_id=AGG_UNIFORM, needs_seq_ids=True,
                          kernel_scale=lambda config, counts: 1.0 / max(counts.num_seqs, 1.0))
    def _seq_sum(g, seq_idx, nseq, config, counts: GlobalCounts):
        return g / max(counts.num_seqs, 1.0)

    try:
        assert AGGREGATIONS.kernel_ids() == (AGG_UNIFORM, AGG_PER_TOKEN)  # shares the uniform branch
        cfg = RCPAConfig.from_dict({"loss": {"aggregation": "test_seq_sum"}}).loss
        logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
        adv, gen, sids = torch.tensor([1.0, 1.0, -1.0]), torch.ones(3, dtype=torch.bool), torch.tensor([0, 0, 1])
        loss, _ = rcpa_loss(logp, logp, adv, gen, config=cfg, seq_ids=sids)
        assert loss.item() == pytest.approx((-1 - 1 + 1) / 2)  # ratio 1: pg = -A per token
        with pytest.raises(ValueError, match="aggregation = 'test_seq_sum' needs seq_ids"):
            rcpa_loss(logp, logp, adv, gen, config=cfg)
    finally:
        AGGREGATIONS.remove("test_seq_sum")
    with pytest.raises(ValueError, match="aggregation = 'test_seq_sum' is out of range"):
        LossConfig(aggregation="test_seq_sum")


def test_max_response_length_is_required_by_the_entry_not_by_name():
    register_aggregation("test_norm", kernel_id=AGG_UNIFORM, needs_max_response_length=True,
                         kernel_scale=lambda config, counts: 1.0 / config.max_response_length)(lambda *a: None)
    try:
        with pytest.raises(ValueError, match="max_response_length = None .* when aggregation = 'test_norm'"):
            LossConfig(aggregation="test_norm")
        assert LossConfig(aggregation="test_norm", max_response_length=8).max_response_length == 8
    finally:
        AGGREGATIONS.remove("test_norm")
