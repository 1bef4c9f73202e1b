"""Running a conversion step on a TP x PP grid of processes (gloo on CPU, NCCL on GPU).

``run_on_layout(fn, tp=2, pp=1, args=...)`` returns ``fn``'s result per rank. It uses
:func:`megatron_rcpa.testing.launcher.run_distributed` (spawned workers with megatron ``parallel_state``
initialised and, on a CPU-only torch, the CPU shim installed). A single-process layout can run in the
calling process instead (``in_process=True``: what the command-line tools do, saving a process start).
"""

from __future__ import annotations

import datetime
from typing import Any, Callable, List, Optional

import torch

__all__ = ["run_on_layout"]


def run_on_layout(fn: Callable[..., Any], *, tp: int, pp: int, args: tuple = (), kwargs: Optional[dict] = None,
                  timeout: float = 3600.0, in_process: bool = False, seed: int = 1234) -> List[Any]:
    """Run ``fn(*args, **kwargs)`` on ``tp * pp`` ranks with megatron's TP/PP state set up; results by rank."""
    kwargs = dict(kwargs or {})
    if tp * pp == 1 and in_process:
        return [_run_in_this_process(fn, args, kwargs, timeout, seed)]
    from megatron_rcpa.testing.launcher import run_distributed

    return run_distributed(fn, world_size=tp * pp, tp=tp, pp=pp, args=args, kwargs=kwargs, timeout=timeout,
                           seed=seed)


def _run_in_this_process(fn: Callable[..., Any], args: tuple, kwargs: dict, timeout: float, seed: int) -> Any:
    if torch.distributed.is_initialized():
        raise RuntimeError("run_on_layout(in_process=True) needs a process without torch.distributed set up")
    from megatron_rcpa.testing.cpu_shim import install_cpu_shim, uninstall_cpu_shim

    shimmed = install_cpu_shim()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    extra = {}
    if backend == "nccl":
        torch.cuda.set_device(0)
        extra["device_id"] = torch.device("cuda", 0)
    store = torch.distributed.TCPStore("127.0.0.1", 0, 1, is_master=True,
                                       timeout=datetime.timedelta(seconds=timeout))
    torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1,
                                         timeout=datetime.timedelta(seconds=timeout), **extra)
    try:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        install_cpu_shim()  # re-scan megatron modules imported just now
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
        return fn(*args, **kwargs)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
        if shimmed:
            uninstall_cpu_shim()
