"""Run a function on N processes with torch.distributed and megatron's model-parallel state set up.

    from megatron_rcpa.runtime.launcher import run_distributed, rank_info

    def my_check(scale):                 # module level: it is pickled by name into each worker
        info = rank_info()
        return info.tp_rank * scale       # anything picklable comes back

    results = run_distributed(my_check, world_size=2, tp=2, args=(10,))   # -> [0, 10], one per rank

Each worker (a ``spawn``-ed process) sets itself up with
:func:`megatron_rcpa.runtime.parallel.init_distributed` (the CPU shim and ``world_size``-shared intra-op threads
without CUDA; a process group, gloo on CPU and nccl with CUDA, on the parent's rendezvous store;
``parallel_state.initialize_model_parallel(tp, pp)`` with data parallel size = world_size / (tp * pp); seeds
from ``seed``), runs ``fn`` and sends back its result; it then tears all of that down.

Workers are *not* daemonic, so they may start helper processes of their own (megatron's checkpoint writer
starts a ``multiprocessing`` manager, and 0.16 forks one writer per file). They still die with their parent:
each asks the kernel for SIGKILL when the parent goes away, and leads its own process group, which the parent
kills as a whole (helpers included) when the run ends, fails or times out.

Nothing hangs: collectives time out after ``timeout`` seconds inside the workers, and the parent kills
every worker when the whole run exceeds ``timeout`` (:class:`DistributedTimeoutError`, naming the ranks
that had not finished and where they were stuck) or as soon as one worker raises
(:class:`DistributedWorkerError`, naming the rank and carrying its traceback).
"""

from __future__ import annotations

import dataclasses
import datetime
import faulthandler
import io
import multiprocessing
import os
import queue as queue_module
import signal
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

__all__ = [
    "DistributedTimeoutError",
    "DistributedWorkerError",
    "RankInfo",
    "rank_info",
    "run_distributed",
]

_JOIN_GRACE_S = 10.0  # how long finished workers get to tear down before they are killed
_POLL_S = 0.05
_STACK_DUMP_WAIT_S = 1.0


class DistributedWorkerError(RuntimeError):
    """A worker raised (or died). ``rank`` is the first failing rank; ``errors`` maps rank -> traceback."""

    def __init__(self, rank: int, errors: Dict[int, str], world_size: int) -> None:
        self.rank = rank
        self.errors = dict(errors)
        self.worker_traceback = errors[rank]
        parts = [f"rank {rank} of {world_size} failed; its traceback:\n{errors[rank]}"]
        for other, text in sorted(errors.items()):
            if other != rank:
                parts.append(f"rank {other} also failed:\n{text}")
        super().__init__("\n".join(parts))


class DistributedTimeoutError(TimeoutError):
    """The run exceeded its timeout. ``ranks`` lists the ranks that had not finished."""

    def __init__(self, ranks: Sequence[int], timeout: float, stacks: Dict[int, str]) -> None:
        self.ranks = list(ranks)
        self.timeout = timeout
        self.stacks = dict(stacks)
        msg = f"run_distributed timed out after {timeout:g} s; ranks not finished: {self.ranks}"
        for rank in self.ranks:
            if stacks.get(rank):
                msg += f"\n--- where rank {rank} was (Python stacks, all threads) ---\n{stacks[rank]}"
        super().__init__(msg)


@dataclasses.dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the megatron process grid."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int


def rank_info() -> RankInfo:
    """This worker's global / tensor- / pipeline- / data-parallel rank and size (inside a worker)."""
    from megatron_rcpa.runtime.parallel import ParallelGroups

    g = ParallelGroups.from_parallel_state()
    return RankInfo(rank=g.rank, world_size=g.world_size, tp_rank=g.tp_rank, tp_size=g.tp_size,
                    pp_rank=g.pp_rank, pp_size=g.pp_size, dp_rank=g.dp_rank, dp_size=g.dp_size)


@dataclasses.dataclass(frozen=True)
class _WorkerSpec:
    world_size: int
    tp: int
    pp: int
    backend: str
    seed: int
    port: int
    timeout: float
    cpu_threads: Optional[int]
    stack_dir: str
    payload: bytes  # (fn, args, kwargs), serialised


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker if the parent process goes away (no orphans left hanging)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort, not on every platform
        pass


def _worker_main(rank: int, spec: _WorkerSpec, results) -> None:
    """Entry point of a spawned worker. Reports ("ok", serialised result) or ("error", traceback text)."""
    _die_with_parent()
    try:
        os.setpgid(0, 0)  # lead a process group: the parent kills it whole, helper processes included
    except OSError:  # pragma: no cover - already a group leader, or not permitted
        pass
    stack_file = None
    if hasattr(signal, "SIGUSR1"):
        stack_file = open(os.path.join(spec.stack_dir, f"rank{rank}.txt"), "w")  # noqa: SIM115
        faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    teardown = None
    try:
        os.environ.update({
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(spec.world_size),
            "LOCAL_WORLD_SIZE": str(spec.world_size),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(spec.port),
            "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        })
        from megatron_rcpa.runtime.parallel import init_distributed
        from megatron_rcpa.runtime.parallel import teardown as _teardown

        store = torch.distributed.TCPStore(
            "127.0.0.1", spec.port, spec.world_size, is_master=False,
            timeout=datetime.timedelta(seconds=spec.timeout),
        )
        teardown = _teardown
        init_distributed(spec.tp, spec.pp, spec.seed, cpu_threads=spec.cpu_threads, timeout_s=spec.timeout,
                         store=store, rank=rank, world_size=spec.world_size, backend=spec.backend)

        fn, args, kwargs = _deserialize(spec.payload)
        result = fn(*args, **kwargs)
        try:
            blob = _serialize(result)
        except Exception as exc:
            raise TypeError(f"the result of {getattr(fn, '__qualname__', fn)!r} on rank {rank} is not "
                            f"picklable: {exc}") from exc
        results.put((rank, "ok", blob))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if teardown is not None:
            try:
                teardown()
            except Exception:  # noqa: BLE001 - teardown after the result went out must not mask it
                pass
        _stop_helpers()
        if stack_file is not None:
            faulthandler.unregister(signal.SIGUSR1)
            stack_file.close()
        # The report is out (join_thread waits until it is in the pipe): skip the interpreter's slow
        # finalisation of torch and megatron (~1-2 s a worker); the parent only needs this process gone.
        results.close()
        results.join_thread()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _stop_helpers() -> None:
    """End the helper processes this worker started (e.g. megatron's writer-results manager): os._exit below
    skips the finalisers that would shut them down."""
    for child in multiprocessing.active_children():
        child.terminate()
    for child in multiprocessing.active_children():
        child.join(timeout=5.0)
        if child.is_alive():
            child.kill()


def _serialize(result: Any) -> bytes:
    """Tensors travel by value (not as shared memory that dies with the worker), through torch.save:
    megatron-core 0.19 re-routes plain pickling of tensor storages through its own module."""
    buffer = io.BytesIO()
    torch.save(result, buffer)
    return buffer.getvalue()


def _deserialize(blob: bytes) -> Any:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)  # our own workers' data


def _check_picklable(fn: Callable, args: tuple, kwargs: dict) -> bytes:
    try:
        return _serialize((fn, args, kwargs))
    except Exception as exc:
        raise TypeError(
            f"run_distributed: fn={fn!r} with its args must be picklable ({exc}); fn must be a function "
            "defined at module level (not a lambda, closure or method of a local class)") from exc


def _kill(procs) -> None:
    """Kill every worker with its process group (the helper processes it started), then reap them."""
    for p in procs:
        if p.pid is None:
            continue
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the worker leads its group once it has started
        except (OSError, AttributeError):
            pass
        if p.is_alive():
            p.kill()
    for p in procs:
        if p.pid is not None:
            p.join(timeout=5.0)


def _read_stacks(stack_dir: str, ranks: Sequence[int]) -> Dict[int, str]:
    stacks = {}
    for rank in ranks:
        try:
            with open(os.path.join(stack_dir, f"rank{rank}.txt")) as f:
                stacks[rank] = f.read().strip()
        except OSError:
            pass
    return stacks


def run_distributed(
    fn: Callable[..., Any],
    *,
    world_size: int,
    tp: int = 1,
    pp: int = 1,
    args: tuple = (),
    kwargs: Optional[dict] = None,
    timeout: float = 120.0,
    backend: Optional[str] = None,
    seed: int = 1234,
    cpu_threads: Optional[int] = None,
) -> List[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` spawned processes; return its results, by rank.

    ``fn`` must be a module-level function: it and ``args``/``kwargs`` are pickled into each worker, which
    imports ``fn``'s module (a script's ``__main__`` works if it guards its own code with
    ``if __name__ == "__main__":``). Its return value must be picklable; tensors come back by value, on
    the CPU.
    ``tp * pp`` must divide ``world_size``; the rest is data parallelism. ``backend`` defaults to nccl
    when CUDA is available, else gloo. ``timeout`` (seconds) bounds the whole run, process start-up
    included, and each collective inside the workers. ``cpu_threads`` sets the workers' intra-op threads on
    a CPU-only torch (default: :func:`megatron_rcpa.runtime.threads.resolve_cpu_threads` with the world size
    as the number of local processes).

    Raises :class:`DistributedWorkerError` when a worker raises or dies (the others are killed at once),
    :class:`DistributedTimeoutError` when the run takes longer than ``timeout``.
    """
    kwargs = {} if kwargs is None else dict(kwargs)
    if world_size < 1 or tp < 1 or pp < 1 or world_size % (tp * pp):
        raise ValueError(f"run_distributed: world_size={world_size} must be a positive multiple of "
                         f"tp*pp = {tp}*{pp}")
    if timeout <= 0:
        raise ValueError(f"run_distributed: timeout={timeout!r} must be > 0 seconds")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if cpu_threads is not None and (isinstance(cpu_threads, bool) or not isinstance(cpu_threads, int)
                                    or cpu_threads < 1):
        raise ValueError(f"run_distributed: cpu_threads={cpu_threads!r}, expected None or an integer >= 1")
    payload = _check_picklable(fn, tuple(args), kwargs)

    start = time.monotonic()
    deadline = start + timeout
    # The parent hosts the rendezvous store on a free port the OS picks: no port race between runs.
    store = torch.distributed.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                                       timeout=datetime.timedelta(seconds=timeout))
    ctx = torch.multiprocessing.get_context("spawn")
    results_q = ctx.Queue()
    procs = []
    with tempfile.TemporaryDirectory(prefix="rcpa_dist_") as stack_dir:
        spec = _WorkerSpec(world_size=world_size, tp=tp, pp=pp, backend=backend, seed=seed,
                           port=store.port, timeout=float(timeout), stack_dir=stack_dir, payload=payload,
                           cpu_threads=cpu_threads)
        try:
            for rank in range(world_size):
                p = ctx.Process(target=_worker_main, args=(rank, spec, results_q),
                                name=f"rcpa-dist-rank{rank}", daemon=False)
                p.start()
                procs.append(p)
            done = _collect(procs, results_q, deadline, timeout, stack_dir, world_size)
            # Everyone reported: give them a moment to tear down cleanly, then make sure they are gone.
            for p in procs:
                p.join(timeout=max(0.0, min(_JOIN_GRACE_S, deadline - time.monotonic())))
            return [_deserialize(done[rank]) for rank in range(world_size)]
        finally:
            _kill(procs)
            results_q.close()
            del store


_DEATH_GRACE_S = 3.0


def _collect(procs, results_q, deadline: float, timeout: float, stack_dir: str,
             world_size: int) -> Dict[int, bytes]:
    """Wait for one report per rank; raise as soon as one fails, a worker dies or the deadline passes."""
    done: Dict[int, bytes] = {}
    errors: Dict[int, str] = {}

    def drain(wait: float) -> None:
        end = time.monotonic() + wait
        while True:
            try:
                rank, status, body = results_q.get(timeout=max(0.0, end - time.monotonic()))
            except queue_module.Empty:
                return
            if status == "ok":
                done[rank] = body
            else:
                errors.setdefault(rank, body)
            wait = 0.0
            end = time.monotonic()  # keep draining what is already there, without waiting further

    def silent_deaths() -> List[int]:
        return [rank for rank, p in enumerate(procs)
                if p.exitcode is not None and rank not in done and rank not in errors]

    while len(done) < world_size:
        drain(_POLL_S)
        if silent_deaths():
            drain(0.5)  # a report written just before exiting may still be in the pipe
        dead = silent_deaths()
        if errors and not dead:
            # a peer's error (e.g. "connection reset") can arrive before a silently dead rank's exit status is
            # visible: give the others a moment to show theirs, so the root cause is reported first
            grace = time.monotonic() + _DEATH_GRACE_S
            while time.monotonic() < grace:
                drain(0.05)  # (reports still in the pipe come in meanwhile)
                if any(procs[r].exitcode not in (None, 0) for r in silent_deaths()):
                    break
            drain(0.2)
            dead = silent_deaths()
        if errors or dead:
            # A rank that died without a word comes first (its peers then fail on closed connections);
            # otherwise the first to report: the others usually fail because of it.
            ordered = {rank: (f"worker process exited with code {procs[rank].exitcode} without reporting a "
                              "result (killed, crashed in native code, or failed while starting: see its "
                              "stderr)") for rank in dead}
            ordered.update(errors)
            _kill(procs)
            raise DistributedWorkerError(next(iter(ordered)), ordered, world_size)
        if time.monotonic() > deadline:
            pending = [rank for rank in range(world_size) if rank not in done]
            for rank in pending:
                p = procs[rank]
                if p.is_alive() and hasattr(signal, "SIGUSR1"):
                    try:
                        os.kill(p.pid, signal.SIGUSR1)
                    except OSError:
                        pass
            time.sleep(_STACK_DUMP_WAIT_S)
            stacks = _read_stacks(stack_dir, pending)
            _kill(procs)
            raise DistributedTimeoutError(pending, timeout, stacks)
    return done
