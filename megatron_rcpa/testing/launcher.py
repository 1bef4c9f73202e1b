"""Moved to :mod:`megatron_rcpa.runtime.launcher` (the converters use it too); re-exported here for tests."""

from megatron_rcpa.runtime.launcher import (
    DistributedTimeoutError,
    DistributedWorkerError,
    RankInfo,
    rank_info,
    run_distributed,
)

__all__ = ["DistributedTimeoutError", "DistributedWorkerError", "RankInfo", "rank_info", "run_distributed"]
