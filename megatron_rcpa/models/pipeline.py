"""Forward-only passes through megatron's pipeline schedule (any PP; PP=1 is the no-pipelining schedule).

    outputs = pipeline_forward(policy, [dict(input_ids=ids, pixel_values=pv, image_grid_thw=grid)],
                               seq_length=ids.shape[1], micro_batch_size=ids.shape[0])
    # last stage: [logits of micro-batch 0, ...]; other stages: None

Each micro-batch is the keyword arguments of the policy's ``forward`` (so a ``kv_cache`` decode step with
``seq_length=1`` works the same way). Every stage must be given the same micro-batches. With sequence
parallelism, ``seq_length`` is the unpadded length (the policy pads to a multiple of TP, and so does this);
KV-cache passes run with it off.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = ["pipeline_forward"]


def pipeline_forward(model: torch.nn.Module, microbatches: Sequence[Dict[str, Any]], *, seq_length: int,
                     micro_batch_size: int) -> Optional[List[Any]]:
    """Run ``model(**mb)`` for every micro-batch through the PP schedule with ``forward_only=True``.

    Returns the last stage's outputs (one per micro-batch) on last-stage ranks, None elsewhere.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rcpa.models.parallel_knobs import sequence_parallel_length, sequence_parallel_off

    def forward_step(data_iterator, module):
        return module(**next(data_iterator)), None

    config = getattr(model, "config", None)
    sp = bool(getattr(config, "sequence_parallel", False))
    if sp and any(mb.get("kv_cache") is not None for mb in microbatches):
        # KV-cache passes run without sequence parallelism (the policy's forward does the same per stage); the
        # schedule sizes its stage-to-stage messages from the config, so it is switched off around it too
        with sequence_parallel_off(model):
            return pipeline_forward(model, microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size)
    if sp:
        seq_length = sequence_parallel_length(config, seq_length)  # the policy pads to a multiple of TP
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(list(microbatches)),
            model=[model],
            num_microbatches=len(microbatches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
        )
    return list(outputs) if parallel_state.is_pipeline_last_stage() else None
