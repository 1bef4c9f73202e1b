"""The RCPA method in plain torch: advantages, loss, curriculum. No Megatron import here: this package is
the reference every kernel and parallel layout is tested against. The variants (advantage estimators, KL
estimators, loss aggregations) are registered by name in :mod:`.registry`."""

from .advantages import AdvantageResult, compute_advantages
from .config import AdvantageConfig, CurriculumConfig, LossConfig, RCPAConfig
from .curriculum import PRE_ALIGNMENT, REINFORCEMENT_ALIGNMENT, Curriculum, CurriculumPlan, schedule_value
from .loss import GlobalCounts, count_tokens, kl_penalty, rcpa_loss
from .registry import (
    ADVANTAGE_ESTIMATORS,
    AGGREGATIONS,
    KL_ESTIMATORS,
    register_advantage_estimator,
    register_aggregation,
    register_kl_estimator,
)

__all__ = [
    "AdvantageResult", "compute_advantages", "AdvantageConfig", "CurriculumConfig", "LossConfig", "RCPAConfig",
    "PRE_ALIGNMENT", "REINFORCEMENT_ALIGNMENT", "Curriculum", "CurriculumPlan", "schedule_value",
    "GlobalCounts", "count_tokens", "kl_penalty", "rcpa_loss",
    "ADVANTAGE_ESTIMATORS", "KL_ESTIMATORS", "AGGREGATIONS", "register_advantage_estimator",
    "register_kl_estimator", "register_aggregation",
]
