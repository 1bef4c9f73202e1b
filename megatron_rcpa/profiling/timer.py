"""Per-phase wall time and peak memory of training steps.

    timer = PhaseTimer()                      # CUDA events on a GPU, time.perf_counter on the CPU
    for step in range(warmup + steps):
        with timer.phase("rollout"):
            ...
        with timer.phase("train"):
            ...
        timer.end_step(record=step >= warmup)  # one device synchronisation per step
    timer.median("rollout"), timer.peak_memory["train"]

On a GPU each phase interval is a pair of CUDA events recorded on the current stream: nothing waits while the
step runs, and :meth:`end_step` synchronises once and reads all the intervals. A phase may be entered several
times in one step (its intervals add up) and phases may nest (each counts its own inclusive time).

Peak memory per phase is ``torch.cuda.max_memory_allocated()`` over the phase's intervals: the peak counter is
reset when a phase starts; when a phase starts or stops inside another, the peak so far is credited to the
enclosing phases first, so nesting does not lose their peaks. None on the CPU.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

__all__ = ["PhaseTimer"]


class PhaseTimer:
    def __init__(self, use_cuda: Optional[bool] = None) -> None:
        self.use_cuda = torch.cuda.is_available() if use_cuda is None else bool(use_cuda)
        self._open: Dict[str, object] = {}  # phase -> start marker (event or perf_counter value)
        self._intervals: Dict[str, List[Tuple[object, object]]] = {}  # this step's closed intervals
        self._step_peak: Dict[str, int] = {}
        self.history: List[Dict[str, float]] = []  # recorded steps: phase -> seconds
        self.peak_memory: Dict[str, Optional[int]] = {}  # phase -> max bytes over recorded steps

    # ------------------------------------------------------------------------------------- markers
    def _marker(self):
        if self.use_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @staticmethod
    def _seconds(start, end) -> float:
        if isinstance(start, float):
            return end - start
        return start.elapsed_time(end) / 1000.0  # CUDA events measure milliseconds

    def _credit_peak(self, phases) -> None:
        if not self.use_cuda:
            return
        peak = int(torch.cuda.max_memory_allocated())
        for name in phases:
            self._step_peak[name] = max(self._step_peak.get(name, 0), peak)

    # ---------------------------------------------------------------------------------------- phases
    def start(self, name: str) -> None:
        if name in self._open:
            raise RuntimeError(f"phase {name!r} is already running")
        if self.use_cuda:
            self._credit_peak(self._open)  # the enclosing phases keep the peak reached so far
            torch.cuda.reset_peak_memory_stats()
        self._open[name] = self._marker()

    def stop(self, name: str) -> None:
        if name not in self._open:
            raise RuntimeError(f"phase {name!r} is not running")
        end = self._marker()
        self._intervals.setdefault(name, []).append((self._open.pop(name), end))
        self._credit_peak([name, *self._open])

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def end_step(self, record: bool = True,
                 reduce: Optional[Callable[[Dict[str, float]], Dict[str, float]]] = None) -> Dict[str, float]:
        """Close the step: synchronise once, return {phase: seconds} and, if ``record``, keep it (warm-up steps
        pass ``record=False``). ``reduce`` maps the step's times before they are returned and kept (e.g. the
        max over ranks: a collective, so it is called on every step, recorded or not)."""
        if self._open:
            raise RuntimeError(f"end_step with phases still running: {sorted(self._open)}")
        if self.use_cuda:
            torch.cuda.synchronize()
        times = {name: sum(self._seconds(a, b) for a, b in spans) for name, spans in self._intervals.items()}
        if reduce is not None:
            times = dict(reduce(times))
        if record:
            self.history.append(times)
            for name in times:
                peak = self._step_peak.get(name) if self.use_cuda else None
                old = self.peak_memory.get(name)
                self.peak_memory[name] = peak if old is None else max(old, peak or 0)
        self._intervals = {}
        self._step_peak = {}
        return times

    # ------------------------------------------------------------------------------------- results
    @property
    def phases(self) -> List[str]:
        """Phase names in order of first appearance over the recorded steps."""
        seen: Dict[str, None] = {}
        for step in self.history:
            for name in step:
                seen.setdefault(name, None)
        return list(seen)

    def times(self, name: str) -> List[float]:
        """Seconds of ``name`` in each recorded step (0 for a step that did not run it)."""
        return [step.get(name, 0.0) for step in self.history]

    def median(self, name: str) -> float:
        values = self.times(name)
        if not values:
            raise ValueError("no recorded steps")
        return float(statistics.median(values))
