"""Shared helpers of the Triton ops: lazy Triton import, interpreter detection, launch sizes, collectives.

Triton is optional for importing this package: without it the ``impl="torch"`` paths work and the Triton
paths raise :class:`TritonUnavailableError` naming what is missing. On a machine without a GPU the kernels
run only in Triton's interpreter, which must be switched on with ``TRITON_INTERPRET=1`` *before* Triton is
first imported in the process (the test suite's conftest does this).
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch

try:  # triton is a hard dependency of megatron-core 0.19 but optional here
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Optional[BaseException] = None
except ImportError as e:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = e

IMPLS = ("triton", "torch", "auto")


class TritonUnavailableError(RuntimeError):
    """Raised when an ``impl="triton"`` op cannot run here."""


def triton_available() -> bool:
    return triton is not None


def interpreter_active() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1`` at Triton's import)."""
    if triton is None:
        return False
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older triton
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_impl(impl: str, op: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl = {impl!r}; expected one of {', '.join(repr(i) for i in IMPLS)}")


def resolve_impl(impl: str, op: str, *tensors: Optional[torch.Tensor]) -> str:
    """Validate ``impl`` and resolve ``"auto"`` (triton on CUDA tensors or under the interpreter, else torch).

    For ``impl="triton"`` fail early, with the reason, when the kernels cannot run on these tensors."""
    check_impl(impl, op)
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if impl == "auto":
        return "triton" if triton is not None and (on_cuda or interpreter_active()) else "torch"
    if impl == "triton":
        if triton is None:
            raise TritonUnavailableError(
                f"{op}(impl='triton') needs the 'triton' package, which failed to import "
                f"({_TRITON_IMPORT_ERROR!r}); install triton or pass impl='torch'")
        if not on_cuda and not interpreter_active():
            raise TritonUnavailableError(
                f"{op}(impl='triton') got CPU tensors but Triton's interpreter is off: set TRITON_INTERPRET=1 "
                "before triton is first imported (slow, for tests), move the tensors to a GPU, or pass "
                "impl='torch' (or impl='auto')")
    return impl


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def env_int(name: str) -> Optional[int]:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError as e:
        raise ValueError(f"environment variable {name} = {v!r}: expected an integer") from e


@functools.cache
def _num_sms(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def vocab_launch_config(v_local: int, n_rows: int, device: torch.device, kind: str) -> Tuple[int, int, int]:
    """(BLOCK_V, num_warps, num_stages) of the row kernels that stream one vocabulary row per program.

    GPU defaults (bandwidth-bound streaming):
    - ``kind="fwd"`` (online softmax, two block reductions per trip): 2048 columns and ONE warp per row,
      so the reductions stay inside a warp (shuffles, no barrier) and many rows are in flight per SM;
      more warps per row only when there are too few rows to give every SM ~32 warps.
    - ``kind="bwd"`` (no reduction, pure read-modify-write): 8192 columns, 16 warps.
    Under the interpreter one block covers a whole (test-sized) row. Environment overrides, for tuning:
    ``MEGATRON_RCPA_{FWD,BWD}_BLOCK_V``, ``MEGATRON_RCPA_{FWD,BWD}_NUM_WARPS``,
    ``MEGATRON_RCPA_{FWD,BWD}_NUM_STAGES``, and ``MEGATRON_RCPA_BLOCK_V`` / ``MEGATRON_RCPA_NUM_WARPS`` for
    both kernels."""
    cap = next_pow2(max(v_local, 16))
    if interpreter_active():
        block, warps, stages = min(cap, 16384), 4, 1
    elif kind == "fwd":
        sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
        warps = min(8, next_pow2(max(1, -(-32 * sms // max(n_rows, 1)))))
        block, stages = min(cap, max(2048, 512 * warps)), 4
    else:
        block, warps, stages = min(cap, 8192), 16, 4
        warps = min(warps, max(1, block // 512))
    k = kind.upper()
    block = env_int(f"MEGATRON_RCPA_{k}_BLOCK_V") or env_int("MEGATRON_RCPA_BLOCK_V") or block
    warps = env_int(f"MEGATRON_RCPA_{k}_NUM_WARPS") or env_int("MEGATRON_RCPA_NUM_WARPS") or warps
    stages = env_int(f"MEGATRON_RCPA_{k}_NUM_STAGES") or stages
    if block & (block - 1):
        raise ValueError(f"MEGATRON_RCPA_*BLOCK_V = {block}: expected a power of two")
    return block, warps, stages


# ---------------------------------------------------------------------------------------------------------
# Row geometry: a [..., V] tensor seen as rows n = i * D1 + j at address i * stride_a + j * stride_b.
# ---------------------------------------------------------------------------------------------------------


def row_geometry(x: torch.Tensor) -> Optional[Tuple[int, int, int, int]]:
    """(N, D1, stride_a, stride_b) addressing every row of ``x`` [..., V] with a unit last-dim stride, or
    None when the leading dims cannot be collapsed to two (then the caller makes ``x`` contiguous)."""
    if x.dim() < 1 or (x.shape[-1] > 1 and x.stride(-1) != 1):
        return None
    dims = [(s, st) for s, st in zip(x.shape[:-1], x.stride()[:-1]) if s != 1]
    n = 1
    for s, _ in dims:
        n *= s
    merged: list = []
    for s, st in dims:  # outer to inner
        if merged and merged[-1][1] == st * s:
            ps, _ = merged[-1]
            merged[-1] = (ps * s, st)
        else:
            merged.append((s, st))
    if not merged:
        return n, 1, 0, 0
    if len(merged) == 1:
        return n, 1, merged[0][1], 0
    if len(merged) == 2:
        return n, merged[1][0], merged[0][1], merged[1][1]
    return None


# ---------------------------------------------------------------------------------------------------------
# Tensor parallelism
# ---------------------------------------------------------------------------------------------------------


def tp_info(tp_group) -> Tuple[int, int]:
    """(rank, world size) of ``tp_group``; (0, 1) when None or torch.distributed is not initialised."""
    if tp_group is None:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def all_gather_stacked(x: torch.Tensor, tp_group, world: int) -> torch.Tensor:
    """ONE all-gather of ``x`` [...] from every rank of ``tp_group`` into [world, ...]."""
    import torch.distributed as dist

    x = x.contiguous()
    # the concatenated form [world * x.shape[0], ...] is the one every backend (gloo included) accepts
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x, group=tp_group)
    return out.view((world,) + tuple(x.shape))
