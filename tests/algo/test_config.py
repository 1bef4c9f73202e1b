"""Config dataclasses: RCPA_SPEC section 6 defaults in one place, errors that name field, value and range."""

import pytest

from megatron_rcpa.algo import AdvantageConfig, CurriculumConfig, LossConfig, RCPAConfig


def test_defaults_are_the_spec():
    c = RCPAConfig()
    assert c.group_size == 8
    cur = c.curriculum
    assert (cur.rho_max, cur.probe_fraction, cur.f_low, cur.f_high, cur.gamma, cur.kappa, cur.ema,
            cur.settle_steps, cur.ratchet) == (0.9, 0.25, 0.05, 0.6, 1.0, 1.0, 0.9, 20, True)
    loss = c.loss
    assert (loss.eps_low, loss.eps_high, loss.beta, loss.alpha, loss.lambda_0, loss.aggregation, loss.kl_type) == \
        (0.2, 0.28, 0.0, 0.0, 1.0, "token_mean", "k3")
    assert c.advantage.estimator == "grpo" and c.advantage.eps == 1e-6


@pytest.mark.parametrize("make, message", [
    (lambda: CurriculumConfig(rho_max=1.2), "CurriculumConfig.rho_max = 1.2 is out of range: "
     "expected 0.0 <= rho_max < 1.0"),
    (lambda: CurriculumConfig(f_low=0.7), "CurriculumConfig.f_high = 0.6 is out of range: "
     "expected f_high > f_low = 0.7"),
    (lambda: CurriculumConfig(ema=float("nan")), "CurriculumConfig.ema = nan"),
    (lambda: CurriculumConfig(settle_steps=-1), "settle_steps = -1 is out of range: expected an integer >= 0"),
    (lambda: CurriculumConfig(schedule="warp"), "schedule = 'warp' is out of range: expected one of 'familiarity'"),
    (lambda: LossConfig(eps_low=1.0), "LossConfig.eps_low = 1.0"),
    (lambda: LossConfig(dual_clip=0.5), "LossConfig.dual_clip = 0.5 is out of range: expected 1.0 < dual_clip"),
    (lambda: LossConfig(kl_type="k4"), "kl_type = 'k4'"),
    (lambda: LossConfig(aggregation="seq_mean_token_sum_norm"), "max_response_length = None"),
    (lambda: LossConfig(beta="0.1"), "LossConfig.beta = '0.1' is out of range: expected a finite number"),
    (lambda: AdvantageConfig(estimator="ppo"), "AdvantageConfig.estimator = 'ppo'"),
    (lambda: RCPAConfig(group_size=0), "RCPAConfig.group_size = 0"),
])
def test_invalid_values_name_field_value_and_range(make, message):
    with pytest.raises(ValueError) as e:
        make()
    assert message in str(e.value)


def test_from_dict_round_trip_and_unknown_keys():
    c = RCPAConfig.from_dict({"group_size": 4, "loss": {"beta": 0.01}, "curriculum": {"gamma": 2.0}})
    assert c.group_size == 4 and c.loss.beta == 0.01 and c.curriculum.gamma == 2.0
    assert RCPAConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="RCPAConfig.loss: unknown key 'betta'; known keys: aggregation"):
        RCPAConfig.from_dict({"loss": {"betta": 0.1}})
