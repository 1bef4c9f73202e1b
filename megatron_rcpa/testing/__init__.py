"""Test support: running the repository's tools (:mod:`.tools`), plus re-exports of the runtime pieces tests use.

The CPU shim, the multi-process launcher, per-name initialisation and the tiny GPT are runtime code in
:mod:`megatron_rcpa.runtime` (the trainer, converters and profiler use them); they are re-exported here so that
tests keep one import. Production modules never import this package.

Importing this package imports torch but not megatron-core; the megatron parts are imported when used.
"""

from .cpu_shim import CudaToCpuMode, install_cpu_shim, is_cpu_shim_installed, uninstall_cpu_shim
from .launcher import DistributedTimeoutError, DistributedWorkerError, RankInfo, rank_info, run_distributed
from .models import (
    gather_global_tensors,
    global_param_names,
    init_global_weights,
    padded_vocab_size,
    tiny_gpt_model,
    tiny_transformer_config,
)

__all__ = [
    "CudaToCpuMode",
    "DistributedTimeoutError",
    "DistributedWorkerError",
    "RankInfo",
    "gather_global_tensors",
    "global_param_names",
    "init_global_weights",
    "install_cpu_shim",
    "is_cpu_shim_installed",
    "padded_vocab_size",
    "rank_info",
    "run_distributed",
    "tiny_gpt_model",
    "tiny_transformer_config",
    "uninstall_cpu_shim",
]
