"""float64 torch references and helpers shared by the ops tests."""

from __future__ import annotations

from typing import Optional

import pytest
import torch


def ref_logprob64(logits: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor] = None,
                  temperature: float = 1.0, vocab_size: Optional[int] = None):
    """(logp, entropy) in float64 of ``softmax(logits / T)`` over the first ``vocab_size`` columns of the
    whole (unsharded) vocabulary; 0 where masked or where the target is outside [0, vocab_size).
    Differentiable w.r.t. ``logits`` (pass a float64 leaf)."""
    x = logits.to(torch.float64) / temperature
    v = x.shape[-1]
    vs = v if vocab_size is None else vocab_size
    pad = torch.arange(v, device=x.device) >= vs
    x = x.masked_fill(pad, float("-inf"))
    lsm = torch.log_softmax(x, dim=-1)
    t = targets.long()
    active = (t >= 0) & (t < vs)
    if mask is not None:
        active = active & mask.bool()
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    logp = torch.where(active, lsm.gather(-1, t.clamp(0, v - 1)[..., None])[..., 0], zero)
    ent = torch.where(active, -(lsm.exp() * lsm.masked_fill(pad, 0.0)).sum(-1), zero)
    return logp, ent


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b the reference), in float64 on the CPU."""
    a = a.detach().to("cpu", torch.float64)
    b = b.detach().to("cpu", torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel() == 0:
        return 0.0
    assert torch.isfinite(a).all(), "non-finite values in the result"
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-2


def require_tp2():
    """The tensor-parallel tests need megatron-core (the launcher) and, on a GPU machine, two GPUs (nccl);
    on a CPU machine they run as two gloo processes under the interpreter."""
    pytest.importorskip("megatron.core")
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("tensor-parallel test on a GPU machine needs 2 GPUs")


def worker_device() -> torch.device:
    """Inside a run_distributed worker: its GPU (set by the launcher) or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
