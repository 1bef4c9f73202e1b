"""Synchronous sharded checkpoint writes with megatron's ``dist_checkpointing``.

Megatron-core (0.16.1 and 0.19.x alike) has one save strategy for its ``torch_dist`` format, and its synchronous
save is the asynchronous machinery run in place: the file writer reports through a queue that it creates as a
``multiprocessing`` manager (a helper *process*, kept for the life of the process), and 0.16 also forks one
writer process per file. A daemonic process may not start children, so such a save fails there with
"daemonic processes are not allowed to have children". Rather than patch megatron's or multiprocessing's
private state, the processes of this project that save are not daemonic: ``torchrun``/``python`` main
processes, and the workers of :func:`megatron_rcpa.runtime.launcher.run_distributed`. :func:`save_sharded`
checks that up front and says what to do instead.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

__all__ = ["save_sharded"]


def save_sharded(sharded_state_dict: Any, directory: str, sharded_strategy: Any = None) -> None:
    """Write ``sharded_state_dict`` (megatron ``ShardedTensor``/``ShardedObject`` leaves) to ``directory``.

    Collective over all ranks; returns when every file is written. ``directory`` must exist. ``sharded_strategy``:
    megatron's (None: its default ``torch_dist`` save). Raises
    RuntimeError, before any collective, when this process is daemonic (see the module docstring).
    """
    process = multiprocessing.current_process()
    if process.daemon:
        raise RuntimeError(
            f"save_sharded({directory!r}): this process ({process.name}, pid {os.getpid()}) is daemonic, and "
            "megatron's dist_checkpointing.save starts helper processes, which a daemonic process may not. Run it "
            "in a main process (python / torchrun) or a megatron_rcpa.runtime.launcher.run_distributed worker, "
            "or start your workers with daemon=False")
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(sharded_state_dict, directory, sharded_strategy=sharded_strategy)
