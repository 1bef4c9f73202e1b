"""How many rollout rows are decoded together: ``rollout.max_rows = auto`` sizes the chunk from a KV-cache budget.

Bytes of KV cache per row, on this rank (one pipeline stage, one TP shard)::

    2 (K and V) x local layers x local KV heads x head_dim x cache length x dtype size

with the cache length the decode path allocates: prompt width + max new tokens, rounded up to
:data:`~megatron_rcpa.rollout.static_decode.LENGTH_BUCKET` on the static path. The rows are
``budget // bytes per row``, agreed over the model-parallel group (the minimum: TP and PP ranks must decode
the same chunks), then rounded down to whole groups by the engine.

The budget is ``rollout.kv_cache_gb`` (GB = 10^9 bytes) when set; otherwise, on a GPU,
:data:`KV_FREE_FRACTION` of the device's free memory measured when the engine is built (after the model, its
gradient buffers and the optimizer exist; the same point in a fresh and in a resumed run), the other part
left for the prefill's activations, the sampling buffers and the training step (Adam's moments are allocated
at the first update or checkpoint load, after this measurement: set ``rollout.kv_cache_gb`` where memory is
tight); on a CPU, :data:`CPU_KV_CACHE_GB`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["CPU_KV_CACHE_GB", "KV_FREE_FRACTION", "cache_length", "default_kv_budget", "kv_bytes_per_row",
           "rows_for_budget"]

#: share of the GPU's free memory (measured when the engine is built) given to the KV cache by default
KV_FREE_FRACTION = 0.5

#: the KV-cache budget on a CPU, in GB (no free-memory probe there)
CPU_KV_CACHE_GB = 4.0

GB = 10 ** 9


def cache_length(width: int, max_new_tokens: int, decode: str = "static") -> int:
    """Cache length of a chunk whose longest prompt (⊕ prefix) is ``width`` tokens."""
    if decode == "static":
        from .static_decode import LENGTH_BUCKET, _round_up

        return _round_up(width + max_new_tokens, LENGTH_BUCKET)
    return int(width + max_new_tokens)


def kv_bytes_per_row(policy, length: int) -> int:
    """KV-cache bytes of one row of ``length`` positions on this rank (its layers, its TP share of KV heads)."""
    lm = policy.language_model
    cfg = lm.config
    layers = list(lm.decoder.layers)
    tp = cfg.tensor_model_parallel_size
    kv_heads = max((cfg.num_query_groups or cfg.num_attention_heads) // tp, 1)
    dtype = layers[0].self_attention.linear_qkv.weight.dtype if layers else cfg.params_dtype
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * len(layers) * kv_heads * cfg.kv_channels * int(length) * size


def default_kv_budget(device: torch.device) -> Tuple[int, str]:
    """(bytes, how they were chosen) of the KV-cache budget when ``rollout.kv_cache_gb`` is not set."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(KV_FREE_FRACTION * free), (f"{KV_FREE_FRACTION:g} x {free / GB:.2f} GB free on {device} "
                                              "(rollout.kv_cache_gb to set it)")
    return int(CPU_KV_CACHE_GB * GB), f"the CPU default of {CPU_KV_CACHE_GB:g} GB (rollout.kv_cache_gb to set it)"


def rows_for_budget(policy, length: int, budget_bytes: int, mp_group=None) -> int:
    """Rows whose KV cache of ``length`` positions fits ``budget_bytes`` on this rank; with ``mp_group``, the
    minimum over its ranks (every TP / PP rank of a model replica decodes the same chunks)."""
    rows = int(budget_bytes // kv_bytes_per_row(policy, length))
    if mp_group is not None and torch.distributed.get_world_size(mp_group) > 1:
        t = torch.tensor([rows], dtype=torch.long, device=_collective_device(mp_group))
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=mp_group)
        rows = int(t.item())
    return rows


def _collective_device(group: Optional[object]) -> torch.device:
    backend = torch.distributed.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
