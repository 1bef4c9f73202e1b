"""Runtime support the trainer, converters and profiler switch on explicitly (not test support).

- :mod:`.parallel`   ``init_distributed(tp, pp, seed)`` -> :class:`ParallelGroups`, ``teardown()``; the one
                     reader of megatron's ``parallel_state``
- :mod:`.cpu_shim`   megatron-core on a CPU-only torch (installed by ``init_distributed`` only without CUDA)
- :mod:`.threads`    intra-op CPU threads of CPU-only runs (``run.cpu_threads``)
- :mod:`.weights`    deterministic per-name initialisation, the same at every TP/PP layout
- :mod:`.checkpoint` synchronous sharded checkpoint writes (``save_sharded``)
- :mod:`.launcher`   ``run_distributed(fn, world_size, tp, pp)``: a function on N local processes
- :mod:`.tiny_gpt`   a tiny GPT (the profiler's ``model.family=gpt``)

Importing this package imports torch but not megatron-core; the megatron parts are imported when used.
"""

from .checkpoint import save_sharded
from .cpu_shim import CudaToCpuMode, install_cpu_shim, is_cpu_shim_installed, uninstall_cpu_shim
from .launcher import DistributedTimeoutError, DistributedWorkerError, RankInfo, rank_info, run_distributed
from .parallel import ParallelGroups, init_distributed, model_parallel_is_initialized, teardown
from .threads import resolve_cpu_threads, set_cpu_threads
from .weights import (
    gather_global_tensors,
    global_param_names,
    init_global_weights,
    init_replicated_by_name,
    padded_vocab_size,
)

__all__ = [
    "CudaToCpuMode",
    "DistributedTimeoutError",
    "DistributedWorkerError",
    "ParallelGroups",
    "RankInfo",
    "gather_global_tensors",
    "global_param_names",
    "init_distributed",
    "init_global_weights",
    "init_replicated_by_name",
    "install_cpu_shim",
    "is_cpu_shim_installed",
    "model_parallel_is_initialized",
    "padded_vocab_size",
    "rank_info",
    "resolve_cpu_threads",
    "run_distributed",
    "save_sharded",
    "set_cpu_threads",
    "teardown",
    "uninstall_cpu_shim",
]
