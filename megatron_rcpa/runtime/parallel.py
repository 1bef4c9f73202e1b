"""Process-group set-up, and the one place that reads megatron's ``parallel_state``.

    groups = init_distributed(tp=2, pp=1, seed=1234)      # torchrun env, or one in-process rank
    loss = train_step(..., groups=groups)                 # pass the groups on, explicitly
    teardown()                                            # undo what init_distributed created

:func:`init_distributed` joins (or creates) the torch.distributed process group, initialises megatron's
model-parallel state, seeds the RNGs and returns a :class:`ParallelGroups`: the tensor/pipeline/data/model
parallel groups with this rank's place in them, in the spirit of Megatron-Core's ``ProcessGroupCollection``.
Code below the set-up takes a ``ParallelGroups`` argument instead of asking ``parallel_state`` again;
:meth:`ParallelGroups.from_parallel_state` is the only reader.

What runs where:

- **process group**: already initialised (a launcher or a caller did it) -> used as is; else the ``torchrun``
  environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) -> ``env://``; else one process,
  world size 1, on a store of its own. ``store``/``rank``/``world_size`` join an existing store instead
  (:func:`megatron_rcpa.runtime.launcher.run_distributed` does). Backend: nccl with CUDA (device
  ``LOCAL_RANK`` mod the device count), gloo without (or ``backend``).
- **CPU-only torch**: the CPU device shim (:mod:`megatron_rcpa.runtime.cpu_shim`) is installed and the
  intra-op threads are set (:func:`megatron_rcpa.runtime.threads.set_cpu_threads`, ``cpu_threads``).
- **parallel_state**: initialised with ``tp``/``pp`` (data parallel = world / (tp * pp)); already
  initialised with the same sizes -> used as is; with other sizes -> an error.
- **seeds**: ``random``, ``torch`` and megatron's model-parallel RNG tracker, from ``seed``.

:func:`teardown` destroys exactly what :func:`init_distributed` created (parallel state, process group,
shim), in reverse order, and is a no-op when nothing was created.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import random
from typing import Any, List, Optional

import torch

from megatron_rcpa.runtime.cpu_shim import install_cpu_shim, is_cpu_shim_installed, uninstall_cpu_shim
from megatron_rcpa.runtime.threads import set_cpu_threads

__all__ = ["ParallelGroups", "init_distributed", "model_parallel_is_initialized", "teardown"]

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True, eq=False)
class ParallelGroups:
    """This rank's process groups and its place in the TP x PP x DP grid (megatron's rank order tp-cp-dp-pp).

    ``pp_first_rank``/``pp_last_rank``/``pp_next_rank``/``pp_prev_rank`` are global ranks in this rank's
    pipeline (next/prev wrap around, as megatron's do). Build it with :meth:`from_parallel_state`.
    """

    rank: int
    world_size: int
    tp_group: Any
    tp_rank: int
    tp_size: int
    pp_group: Any
    pp_rank: int
    pp_size: int
    dp_group: Any
    dp_rank: int
    dp_size: int
    mp_group: Any  # tensor x pipeline (the model-parallel group of megatron)
    cp_size: int
    is_first_stage: bool
    is_last_stage: bool
    pp_first_rank: int
    pp_last_rank: int
    pp_next_rank: int
    pp_prev_rank: int

    @classmethod
    def from_parallel_state(cls) -> ParallelGroups:
        """Read megatron's ``parallel_state`` (this is the only place that does); it must be initialised."""
        from megatron.core import parallel_state as ps

        if not torch.distributed.is_initialized() or not ps.model_parallel_is_initialized():
            raise RuntimeError("ParallelGroups.from_parallel_state: megatron's parallel_state is not initialised; "
                               "call megatron_rcpa.runtime.parallel.init_distributed(tp, pp, seed) first")
        return cls(
            rank=torch.distributed.get_rank(),
            world_size=torch.distributed.get_world_size(),
            tp_group=ps.get_tensor_model_parallel_group(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            pp_group=ps.get_pipeline_model_parallel_group(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            pp_size=ps.get_pipeline_model_parallel_world_size(),
            dp_group=ps.get_data_parallel_group(),
            dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
            mp_group=ps.get_model_parallel_group(),
            cp_size=ps.get_context_parallel_world_size(),
            is_first_stage=ps.is_pipeline_first_stage(),
            is_last_stage=ps.is_pipeline_last_stage(),
            pp_first_rank=ps.get_pipeline_model_parallel_first_rank(),
            pp_last_rank=ps.get_pipeline_model_parallel_last_rank(),
            pp_next_rank=ps.get_pipeline_model_parallel_next_rank(),
            pp_prev_rank=ps.get_pipeline_model_parallel_prev_rank(),
        )

    @classmethod
    def current(cls) -> Optional[ParallelGroups]:
        """:meth:`from_parallel_state` when megatron's parallel state is initialised, else None."""
        return cls.from_parallel_state() if model_parallel_is_initialized() else None

    def as_dict(self) -> dict:
        """The ranks, sizes and stage flags (not the group handles): picklable, for logs and tests."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.endswith("_group")}


def model_parallel_is_initialized() -> bool:
    """Whether torch.distributed and megatron's parallel state are both set up in this process."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    from megatron.core import parallel_state as ps

    return ps.model_parallel_is_initialized()


# What init_distributed created in this process, undone by teardown() (last in, first out).
_CREATED: List[str] = []


def init_distributed(tp: int, pp: int, seed: int, cpu_threads: Optional[int] = None, timeout_s: float = 1800,
                     *, store: Optional[Any] = None, rank: Optional[int] = None,
                     world_size: Optional[int] = None, backend: Optional[str] = None) -> ParallelGroups:
    """Set up torch.distributed and megatron's parallel state for a TP x PP layout; return this rank's groups.

    See the module docstring for what happens where. ``cpu_threads`` (``run.cpu_threads``) overrides the
    automatic intra-op thread count of CPU-only runs. ``timeout_s`` bounds every collective. ``store``,
    ``rank`` and ``world_size`` (all three or none) join an existing rendezvous store. ``backend`` overrides
    the default (nccl with CUDA, gloo without) when this call creates the process group.
    """
    for name, value in (("tp", tp), ("pp", pp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"init_distributed: {name} = {value!r}, expected an integer >= 1")
    if timeout_s <= 0:
        raise ValueError(f"init_distributed: timeout_s = {timeout_s!r}, expected > 0 seconds")
    explicit = (store is not None, rank is not None, world_size is not None)
    if any(explicit) and not all(explicit):
        raise ValueError("init_distributed: store, rank and world_size are given together or not at all "
                         f"(got store={store!r}, rank={rank!r}, world_size={world_size!r})")
    cuda = torch.cuda.is_available()
    created_before = len(_CREATED)  # a failed call undoes only what it created itself
    timeout = datetime.timedelta(seconds=timeout_s)
    dist = torch.distributed
    if dist.is_initialized():
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    elif store is not None:
        local_world = world_size
    elif all(k in os.environ for k in _TORCHRUN_ENV):
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    else:
        local_world = 1
    set_cpu_threads(cpu_threads, local_world)  # CPU-only; with CUDA it only checks the value
    if not cuda and not is_cpu_shim_installed():
        install_cpu_shim()
        _CREATED.append("shim")
    try:
        if not dist.is_initialized():
            backend = backend or ("nccl" if cuda else "gloo")
            extra = {}
            if backend == "nccl":
                device = int(os.environ.get("LOCAL_RANK", rank or 0)) % torch.cuda.device_count()
                torch.cuda.set_device(device)
                extra["device_id"] = torch.device("cuda", device)
            if store is not None:
                dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
                                        **extra)
            elif all(k in os.environ for k in _TORCHRUN_ENV):
                dist.init_process_group(backend, timeout=timeout, **extra)
            else:  # a plain `python ...` start: one process
                own = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timeout)
                dist.init_process_group(backend, store=own, rank=0, world_size=1, timeout=timeout, **extra)
            _CREATED.append("process_group")

        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        world = dist.get_world_size()
        if world % (tp * pp):
            raise ValueError(f"world size {world} is not a multiple of parallel.tp x parallel.pp = {tp} x {pp}")
        if ps.model_parallel_is_initialized():
            have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
            if have != (tp, pp):
                raise ValueError(f"megatron's parallel state is already initialised with tp x pp = {have[0]} x "
                                 f"{have[1]}, but tp x pp = {tp} x {pp} was asked for")
        else:
            ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                         distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)))
            _CREATED.append("parallel_state")
        if not cuda:
            install_cpu_shim()  # re-scan: megatron modules imported just now may hold the CUDA-RNG helpers
        random.seed(seed)
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
        return ParallelGroups.from_parallel_state()
    except BaseException:
        _undo(created_before)
        raise


def teardown() -> None:
    """Undo what :func:`init_distributed` created in this process (parallel state, process group, CPU shim)."""
    _undo(0)


def _undo(down_to: int) -> None:
    while len(_CREATED) > down_to:
        what = _CREATED.pop()
        if what == "parallel_state":
            from megatron.core import parallel_state as ps

            ps.destroy_model_parallel()
        elif what == "process_group":
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        elif what == "shim":
            uninstall_cpu_shim()
