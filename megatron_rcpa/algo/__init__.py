"""The RCPA method in plain torch: advantages, loss, curriculum. No Megatron import here: this package is
the reference every kernel and parallel layout is tested against."""

from .advantages import ESTIMATORS, AdvantageResult, compute_advantages
from .config import AdvantageConfig, CurriculumConfig, LossConfig, RCPAConfig
from .curriculum import PRE_ALIGNMENT, REINFORCEMENT_ALIGNMENT, Curriculum, CurriculumPlan, schedule_value
from .loss import GlobalCounts, count_tokens, kl_penalty, rcpa_loss

__all__ = [
    "ESTIMATORS", "AdvantageResult", "compute_advantages", "AdvantageConfig", "CurriculumConfig", "LossConfig",
    "RCPAConfig", "PRE_ALIGNMENT", "REINFORCEMENT_ALIGNMENT", "Curriculum", "CurriculumPlan", "schedule_value",
    "GlobalCounts", "count_tokens", "kl_penalty", "rcpa_loss",
]
