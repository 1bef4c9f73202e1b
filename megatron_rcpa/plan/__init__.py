"""Memory planning: per-GPU memory by pipeline stage for a run configuration (``rcpa-plan``)."""

from megatron_rcpa.plan.memory import GPUS, Plan, PlanInputs, StageMemory, plan_memory, stage_layer_counts
from megatron_rcpa.plan.recompute import recompute_overrides
from megatron_rcpa.plan.shapes import ModelShape, VisionShape, model_shape

__all__ = ["GPUS", "ModelShape", "Plan", "PlanInputs", "StageMemory", "VisionShape", "model_shape", "plan_memory",
           "recompute_overrides", "stage_layer_counts"]
