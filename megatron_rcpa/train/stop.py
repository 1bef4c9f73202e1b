"""Stopping a run early without losing progress: save the current step and exit 0.

Three ways to ask, checked once per step (after the step, before the next one starts):

- a signal, ``run.save_signals`` (default ``[USR1, TERM]``; Slurm sends USR1 ``--signal=B:USR1@T`` before the
  time limit and TERM at preemption; an empty list leaves the signals alone). The handler only records the
  request; the step in flight finishes first.
- a stop file, ``run.stop_file`` (default ``<run.output_dir>/SAVE_AND_EXIT``; empty = off): a batch script can
  ``touch`` it even when torchrun does not forward the signal to the workers. It is removed after the save.
- a wall-clock budget, ``run.save_by_seconds`` (counted from the start of the process, as NeMo-RL's
  ``checkpoint_must_save_by``): the run saves and stops when another step plus a save would not fit in what is
  left, using the longest step and the last save measured so far.

Every rank contributes its own view and the flags are all-reduced (MAX) over the whole world, so all ranks stop
after the same step even if only one of them got the signal or sees the file.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Dict, List, Optional, Sequence

STOP_LINE = "[rcpa] stop requested ({reason}): saved step {step}, exiting"


def _signal_number(name: str) -> int:
    key = name.upper()
    if not key.startswith("SIG"):
        key = "SIG" + key
    num = getattr(signal, key, None)
    if not isinstance(num, signal.Signals):
        raise ValueError(f"run.save_signals: unknown signal {name!r} (expected names such as USR1, TERM, INT)")
    return int(num)


def check_signal_names(names: Sequence[str]) -> None:
    """Config-time check: every entry names a catchable signal."""
    for name in names:
        num = _signal_number(str(name))
        if num in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"run.save_signals: {name!r} cannot be caught")


def process_start_time() -> float:
    """Wall-clock time this process started (what ``run.save_by_seconds`` counts from)."""
    import psutil

    return psutil.Process(os.getpid()).create_time()


class StopRequests:
    """Collects stop requests (signals, a stop file, a time budget) and agrees on them over all ranks."""

    def __init__(self, signals: Sequence[str] = ("USR1", "TERM"), stop_file: Optional[str] = None,
                 save_by_seconds: Optional[float] = None, start_time: Optional[float] = None) -> None:
        self.signal_names = [str(s) for s in signals]
        self.signal_nums = [_signal_number(s) for s in self.signal_names]
        self.stop_file = stop_file or None
        self.save_by_seconds = save_by_seconds
        self.start_time = process_start_time() if start_time is None else start_time
        self._received: List[int] = []
        self._previous: Dict[int, object] = {}
        self.step_times: List[float] = []
        self.save_time: Optional[float] = None

    # ---------------------------------------------------------------------------------------- signals
    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if signum not in self._received:
            self._received.append(signum)

    def install(self) -> StopRequests:
        import threading

        if threading.current_thread() is not threading.main_thread():
            if self.signal_nums:
                raise RuntimeError("run.save_signals: signal handlers can only be installed from the main thread "
                                   "(set run.save_signals=[] to run the trainer in another thread)")
            return self
        for num in self.signal_nums:
            self._previous[num] = signal.signal(num, self._handler)
        return self

    def uninstall(self) -> None:
        for num, prev in self._previous.items():
            signal.signal(num, prev)
        self._previous.clear()

    # ------------------------------------------------------------------------------------- measurements
    def record_step_time(self, seconds: float) -> None:
        self.step_times.append(float(seconds))

    def record_save_time(self, seconds: float) -> None:
        self.save_time = float(seconds)

    def _over_budget(self) -> bool:
        if not self.save_by_seconds:
            return False
        left = self.save_by_seconds - (time.time() - self.start_time)
        step = max(self.step_times) if self.step_times else 0.0
        save = self.save_time if self.save_time is not None else step  # before the first save: guess a step
        return left <= step + save

    # ------------------------------------------------------------------------------------------ check
    def check(self, device=None) -> Optional[str]:
        """The agreed reason to stop now (the same string on every rank), or None. A collective: every rank
        calls it once per step."""
        import torch

        flags = [1.0 if num in self._received else 0.0 for num in self.signal_nums]
        flags.append(1.0 if self.stop_file and os.path.exists(self.stop_file) else 0.0)
        flags.append(1.0 if self._over_budget() else 0.0)
        vec = torch.tensor(flags, dtype=torch.float32, device=device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(vec, op=torch.distributed.ReduceOp.MAX)
        got = vec.cpu().tolist()
        reasons = [f"SIG{n.upper().removeprefix('SIG')}" for n, f in zip(self.signal_names, got) if f > 0]
        if got[-2] > 0:
            reasons.append(f"stop file {self.stop_file}")
        if got[-1] > 0:
            reasons.append(f"run.save_by_seconds={self.save_by_seconds:g} nearly spent")
        return ", ".join(reasons) if reasons else None

    def clear_stop_file(self) -> None:
        """Remove the stop file after the save, so the next run (a requeue) does not stop at once."""
        if self.stop_file:
            try:
                os.remove(self.stop_file)
            except FileNotFoundError:
                pass


__all__ = ["StopRequests", "STOP_LINE", "check_signal_names", "process_start_time"]
