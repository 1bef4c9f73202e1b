"""TEMPORARY (lead): replaced by the runtime branch's ParallelGroups at merge."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ParallelGroups:
    tp_group: Any
    pp_group: Any
    dp_group: Any
    tp_size: int
    pp_size: int
    dp_size: int
    dp_rank: int
    is_last_stage: bool
    is_first_stage: bool
    pp_last_rank: int

    @classmethod
    def from_parallel_state(cls) -> ParallelGroups:
        from megatron.core import parallel_state as ps

        return cls(ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group(),
                   ps.get_data_parallel_group(), ps.get_tensor_model_parallel_world_size(),
                   ps.get_pipeline_model_parallel_world_size(), ps.get_data_parallel_world_size(),
                   ps.get_data_parallel_rank(), ps.is_pipeline_last_stage(), ps.is_pipeline_first_stage(),
                   ps.get_pipeline_model_parallel_last_rank())
