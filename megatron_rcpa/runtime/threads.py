"""Intra-op CPU threads for CPU-only runs.

torch's default intra-op pool has one thread per core in *every* process. With several ranks on one machine,
or other load on it, the threads of each op contend for the same cores and an op waits for its slowest
thread: on a loaded 2-core machine the tiny demo ran at 5-15 s/step with the default and at 0.5 s/step with
one thread. So a CPU-only run sets the pool explicitly, in this order:

1. ``requested`` (``run.cpu_threads`` in the trainer's config) when it is set;
2. else ``OMP_NUM_THREADS`` when the environment sets it (an explicit choice of the user; ``torchrun`` sets 1
   when it starts several processes per node);
3. else the usable cores (``os.sched_getaffinity``) divided by the processes on this machine
   (``local_world_size``, default ``LOCAL_WORLD_SIZE`` from torchrun, else 1), at least 1.

With CUDA the pool is left alone (the work runs on the GPU).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

__all__ = ["resolve_cpu_threads", "set_cpu_threads", "usable_cores"]


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), or ``os.cpu_count()`` where that is unknown."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} = {value!r}: expected an integer >= 1")
    return value


def resolve_cpu_threads(requested: Optional[int] = None, local_world_size: Optional[int] = None) -> int:
    """The intra-op thread count a CPU-only process should use (rules in the module docstring)."""
    if requested is not None:
        return _positive_int(requested, "run.cpu_threads")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            return _positive_int(int(env), "OMP_NUM_THREADS")
        except ValueError as exc:
            raise ValueError(f"OMP_NUM_THREADS = {env!r} in the environment: expected an integer >= 1 "
                             "(or unset it)") from exc
    if local_world_size is None:
        raw = os.environ.get("LOCAL_WORLD_SIZE", "1")
        try:
            local_world_size = int(raw)
        except ValueError as exc:
            raise ValueError(f"LOCAL_WORLD_SIZE = {raw!r} in the environment: expected an integer >= 1") from exc
    local_world_size = _positive_int(local_world_size, "local_world_size")
    return max(1, usable_cores() // local_world_size)


def set_cpu_threads(requested: Optional[int] = None, local_world_size: Optional[int] = None) -> Optional[int]:
    """On a CPU-only torch, set the intra-op thread count (:func:`resolve_cpu_threads`) and return it.

    With CUDA nothing changes and None is returned. (``requested`` is still checked, so a bad value fails the
    same way everywhere.)
    """
    threads = resolve_cpu_threads(requested, local_world_size)
    if torch.cuda.is_available():
        return None
    torch.set_num_threads(threads)
    return threads
