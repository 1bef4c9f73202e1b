"""Running a conversion step on a TP x PP grid of processes (gloo on CPU, NCCL on GPU).

``run_on_layout(fn, tp=2, pp=1, args=...)`` returns ``fn``'s result per rank. It uses
:func:`megatron_rcpa.runtime.launcher.run_distributed` (spawned workers with megatron ``parallel_state``
initialised and, on a CPU-only torch, the CPU shim installed). A single-process layout can run in the
calling process instead (``in_process=True``: what the command-line tools do, saving a process start), set up
and torn down by :func:`megatron_rcpa.runtime.parallel.init_distributed` / ``teardown``.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch

from megatron_rcpa.runtime.launcher import run_distributed
from megatron_rcpa.runtime.parallel import init_distributed, teardown

__all__ = ["run_on_layout"]


def run_on_layout(fn: Callable[..., Any], *, tp: int, pp: int, args: tuple = (), kwargs: Optional[dict] = None,
                  timeout: float = 3600.0, in_process: bool = False, seed: int = 1234) -> List[Any]:
    """Run ``fn(*args, **kwargs)`` on ``tp * pp`` ranks with megatron's TP/PP state set up; results by rank."""
    kwargs = dict(kwargs or {})
    if tp * pp == 1 and in_process:
        return [_run_in_this_process(fn, args, kwargs, timeout, seed)]
    return run_distributed(fn, world_size=tp * pp, tp=tp, pp=pp, args=args, kwargs=kwargs, timeout=timeout,
                           seed=seed)


def _run_in_this_process(fn: Callable[..., Any], args: tuple, kwargs: dict, timeout: float, seed: int) -> Any:
    if torch.distributed.is_initialized():
        raise RuntimeError("run_on_layout(in_process=True) needs a process without torch.distributed set up")
    init_distributed(1, 1, seed, timeout_s=timeout)
    try:
        return fn(*args, **kwargs)
    finally:
        teardown()
