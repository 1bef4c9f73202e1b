"""Never apply a non-finite update.

Megatron's FP32 and bf16 optimizers check for inf/NaN only when a loss scaler is in use (fp16); otherwise a NaN
gradient norm is clipped with a NaN coefficient and Adam writes NaN into every weight. :class:`NonFiniteGuard`
wraps the optimizer returned by ``get_megatron_optimizer``: its ``step()`` first computes the gradient norm with
the optimizer's own ``prepare_grads`` + ``get_grad_norm`` (the same norm megatron clips with: reduced over the
model-parallel and, with the distributed optimizer, data-parallel groups, so every rank reaches the same
verdict) and skips the update when it is not finite. A NaN/inf loss reaches the gradients through backward and
is skipped with them. Skips are counted (``skipped_total``, ``consecutive_skips``); the trainer logs them and
stops with :class:`NonFiniteUpdateError` after ``optim.max_skipped_updates`` in a row.

Everything else (``param_groups``, ``zero_grad``, ``sharded_state_dict``, ``load_state_dict``, ...) is the
wrapped optimizer's. Cost: the norm is computed once more when the update goes ahead (megatron's clip path
computes its own), one extra pass over the local gradients and one small all-reduce.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple


class NonFiniteUpdateError(RuntimeError):
    """Too many consecutive updates had a non-finite gradient norm: training cannot make progress."""


class NonFiniteGuard:
    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.skipped_total = 0
        self.consecutive_skips = 0
        self.last_skipped = False

    def __getattr__(self, name: str) -> Any:  # everything but step() is the wrapped optimizer's
        if name == "optimizer":  # not set yet (unpickling): avoid recursing
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def step(self) -> Tuple[bool, Optional[float], Optional[int]]:
        """``(update_applied, grad_norm, num_zeros)`` like megatron's ``step()``; grad_norm is always given."""
        import torch

        with torch.no_grad():
            found_inf = self.optimizer.prepare_grads()
            norm = float("nan") if found_inf else float(self.optimizer.get_grad_norm())
        if not math.isfinite(norm):
            self.skipped_total += 1
            self.consecutive_skips += 1
            self.last_skipped = True
            return False, norm, None
        ok, clipped_norm, zeros = self.optimizer.step()
        self.last_skipped = not ok
        if ok:
            self.consecutive_skips = 0
        return ok, norm if clipped_norm is None else clipped_norm, zeros


__all__ = ["NonFiniteGuard", "NonFiniteUpdateError"]
