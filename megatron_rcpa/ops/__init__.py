"""Fused Triton kernels of the RCPA training path, each with a plain-torch twin (``impl="torch"``).

- :func:`masked_logprob` — per-token log p(target) (and entropy) from (vocabulary-parallel) logits, one pass
  forward, one pass backward, exact under tensor parallelism with one small all-gather.
- :func:`rcpa_loss_from_logits` — the whole RCPA loss from the logits: equals
  ``megatron_rcpa.algo.loss.rcpa_loss`` applied to ``masked_logprob``, value and gradient.
- :func:`group_advantages` — group advantages (every estimator of ``algo.registry.ADVANTAGE_ESTIMATORS``) of a
  packed batch in one launch.

Every op takes ``impl="triton"`` (default) | ``"torch"`` | ``"auto"``. On a machine without a GPU the
Triton kernels run only in the interpreter (``TRITON_INTERPRET=1`` before triton is first imported).
"""

from ._triton_utils import TritonUnavailableError, interpreter_active, triton_available
from .advantages import group_advantages
from .logprob import masked_logprob
from .rcpa_loss import rcpa_loss_from_logits

__all__ = [
    "masked_logprob",
    "rcpa_loss_from_logits",
    "group_advantages",
    "TritonUnavailableError",
    "interpreter_active",
    "triton_available",
]
