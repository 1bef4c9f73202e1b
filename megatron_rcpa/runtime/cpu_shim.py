"""A shim that lets megatron-core (0.16.x and 0.19.x) run on a CPU-only torch with gloo.

A runtime feature, switched on explicitly: :func:`megatron_rcpa.runtime.parallel.init_distributed` installs it
when torch has no CUDA (the trainer, converters and profiler on a CPU; tests; demos), never on a GPU.

Megatron-Core assumes CUDA in a few dozen places: it seeds and forks the CUDA generator, creates tensors on
``"cuda"``/``torch.cuda.current_device()``, asserts ``tensor.type() == "torch.cuda.FloatTensor"`` and (0.19)
records CUDA streams and events in its DDP. :func:`install_cpu_shim` redirects exactly those uses to the CPU:

1. **RNG.** ``torch.cuda.{get,set}_rng_state[_all]``, ``torch.cuda.manual_seed[_all]`` (also under
   ``torch.cuda.random``) and megatron's ``tensor_parallel.random._get_cuda_rng_state`` /
   ``_set_cuda_rng_state`` act on the CPU default generator, so megatron's RNG tracker (``fork()``) swaps the
   CPU generator state the way it swaps the CUDA one on a GPU. The two megatron helpers are replaced on
   every loaded module that holds them by name (and on megatron modules that define their own copy).
2. **Device.** ``torch.cuda.current_device()`` returns ``torch.device("cpu")``; ``torch.cuda.synchronize``
   is a no-op.
3. **Tensors.** A global :class:`torch.overrides.TorchFunctionMode` (:class:`CudaToCpuMode`) rewrites any
   CUDA device (``"cuda"``, ``"cuda:1"``, ``torch.device("cuda")``, a bare index) to the CPU in every
   ``device=`` keyword, in ``Tensor.to(...)`` and ``Tensor.cuda()``; drops ``pin_memory``
   (``Tensor.pin_memory()`` returns the tensor itself); and makes
   ``Tensor.type()`` answer ``"torch.cuda.FloatTensor"`` for a CPU float tensor (and accept such a name as a
   target type).
4. **Streams and events.** ``torch.cuda.Stream``/``Event`` become do-nothing stand-ins;
   ``torch.cuda.current_stream``/``default_stream`` return one shared stand-in stream,
   ``torch.cuda.set_stream`` and ``Tensor.record_stream`` are no-ops and ``torch.cuda.stream(...)`` an empty
   context. CPU work is synchronous, so waiting on nothing is correct.

5. **Recompute.** megatron's checkpoint functions (activation recompute) run their backward with the mode in
   (3) pushed again: torch pops a mode while its handler runs ``torch.autograd.backward``, and the recomputed
   forward inside creates CUDA tensors.

``torch.cuda.is_available()`` keeps answering False. Everything is undone by :func:`uninstall_cpu_shim`.

The mode in (3) lives on torch's thread-local mode stack: it covers the thread that called
:func:`install_cpu_shim` (and the autograd work it starts), not threads started elsewhere. Each spawned
worker process must install the shim itself: :func:`megatron_rcpa.runtime.launcher.run_distributed` does.

What the shim does *not* do (see docs/ENVIRONMENT.md): fused kernels and TE/apex modules still need a GPU,
so configs must keep ``gradient_accumulation_fusion``, ``persist_layer_norm``, ``apply_rope_fusion`` False
and use the local (non-TE) layer specs — :mod:`megatron_rcpa.runtime.tiny_gpt` does this.
"""

from __future__ import annotations

import contextlib
import sys
import types
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "CudaToCpuMode",
    "install_cpu_shim",
    "is_cpu_shim_installed",
    "uninstall_cpu_shim",
]

_CPU = torch.device("cpu")

# (owner, attribute, previous value, whether the attribute existed), in patch order.
_PATCHES: List[Tuple[Any, str, Any, bool]] = []
_MODE: Optional[CudaToCpuMode] = None
_MEGATRON_RNG_NAMES = ("_get_cuda_rng_state", "_set_cuda_rng_state")


# ---------------------------------------------------------------------------------------------- devices
def _cpu_if_cuda(device: Any) -> Any:
    """Map a CUDA device given as str / torch.device / int index to the CPU; leave anything else alone."""
    if isinstance(device, torch.device):
        return _CPU if device.type == "cuda" else device
    if isinstance(device, str):
        return _CPU if device.split(":", 1)[0] == "cuda" else device
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU  # a bare index means a CUDA ordinal
    return device


def _to_cuda_type_name(name: str) -> str:
    """'torch.FloatTensor' -> 'torch.cuda.FloatTensor' (dense CPU tensor type names only)."""
    prefix, _, rest = name.partition(".")
    if prefix == "torch" and rest and "." not in rest:
        return f"torch.cuda.{rest}"
    return name


def _from_cuda_type_name(name: str) -> str:
    return name.replace("torch.cuda.", "torch.", 1) if name.startswith("torch.cuda.") else name


_Tensor = torch.Tensor


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA devices to the CPU in every torch call (see the module docstring, item 3)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: A002 - torch's signature
        kwargs = dict(kwargs) if kwargs else {}
        if func is _Tensor.to:
            args = tuple(_cpu_if_cuda(a) for a in args[:2]) + tuple(args[2:])
        elif func is _Tensor.cuda:
            return args[0]
        elif func is _Tensor.pin_memory:
            return args[0]
        elif func is _Tensor.type:
            if len(args) == 1 and not kwargs.get("dtype"):
                return _to_cuda_type_name(func(args[0]))
            if len(args) > 1 and isinstance(args[1], str):
                args = (args[0], _from_cuda_type_name(args[1])) + tuple(args[2:])
            if isinstance(kwargs.get("dtype"), str):
                kwargs["dtype"] = _from_cuda_type_name(kwargs["dtype"])
        if kwargs:
            if "device" in kwargs:
                kwargs["device"] = _cpu_if_cuda(kwargs["device"])
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------- streams and events
class _CpuEvent:
    """Stand-in for ``torch.cuda.Event``: CPU work is synchronous, so an event is always complete."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False,
                 external: bool = False) -> None:
        self.enable_timing = enable_timing

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end_event: Any) -> float:
        return 0.0


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream``: every wait is a no-op."""

    cuda_stream = 0

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any) -> None:
        self.device = _CPU
        self.priority = priority

    @staticmethod
    def priority_range() -> Tuple[int, int]:
        return (0, 0)

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        event = _CpuEvent() if event is None else event
        event.record(self)
        return event

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


_CURRENT_STREAM = _CpuStream()


def _record_stream(self: torch.Tensor, stream: Any) -> None:
    """``Tensor.record_stream`` tells the CUDA caching allocator about another stream: nothing to do here."""


def _current_stream(device: Any = None) -> _CpuStream:
    return _CURRENT_STREAM


def _stream_context(stream: Any = None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext(stream)


# ---------------------------------------------------------------------------------------------- the RNG
def _as_state(state: Any) -> torch.Tensor:
    return state.get_state() if isinstance(state, torch.Generator) else state


def _get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.default_generator.get_state()


def _set_rng_state(new_state: Any, device: Any = "cuda") -> None:
    torch.default_generator.set_state(_as_state(new_state))


def _get_rng_state_all() -> List[torch.Tensor]:
    return [torch.default_generator.get_state()]


def _set_rng_state_all(new_states: Any) -> None:
    for state in new_states:
        torch.default_generator.set_state(_as_state(state))


def _manual_seed(seed: int) -> None:
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, i.e. back into this shim.
    torch.default_generator.manual_seed(int(seed))


def _megatron_get_cuda_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    return torch.default_generator.get_state()  # always a fresh tensor, so ``clone`` is moot


def _megatron_set_cuda_rng_state(new_state: Any, device: Any = -1, graph_safe: bool = False) -> None:
    torch.default_generator.set_state(_as_state(new_state))


_MEGATRON_REPLACEMENTS = {
    "_get_cuda_rng_state": _megatron_get_cuda_rng_state,
    "_set_cuda_rng_state": _megatron_set_cuda_rng_state,
}


# ------------------------------------------------------------------------------------------- patching
def _patch(owner: Any, name: str, value: Any) -> None:
    had = name in vars(owner)  # not inherited: on uninstall an inherited attribute is deleted, not copied
    _PATCHES.append((owner, name, vars(owner).get(name), had))
    setattr(owner, name, value)


def _patch_megatron_rng_references() -> int:
    """Replace megatron's CUDA-RNG helpers wherever a loaded module holds them; returns how many."""
    try:
        import megatron.core.tensor_parallel.random  # noqa: F401 - so that the helpers exist to patch
    except ImportError:
        return 0
    patched = 0
    for module in list(sys.modules.values()):
        if not isinstance(module, types.ModuleType):
            continue
        for name in _MEGATRON_RNG_NAMES:
            value = getattr(module, name, None) if name in getattr(module, "__dict__", {}) else None
            if value is None or value is _MEGATRON_REPLACEMENTS[name]:
                continue
            # The original, imported by name anywhere, or a copy some megatron module defines itself.
            owner = str(getattr(value, "__module__", ""))
            if callable(value) and (owner.split(".")[0] in ("megatron", "megatron_fsdp")):
                _patch(module, name, _MEGATRON_REPLACEMENTS[name])
                patched += 1
    return patched


def _patch_megatron_checkpoint_backward() -> int:
    """Keep the mode on while megatron's activation-recompute functions recompute in backward.

    ``torch.autograd.backward`` itself passes through :class:`CudaToCpuMode`, and torch pops a mode while its
    handler runs, so Python code that the autograd engine runs inside (a checkpoint's recomputed forward,
    which creates ``device="cuda"`` masks) would run without it. Returns how many backwards were wrapped."""
    try:
        from megatron.core.tensor_parallel import random as mcore_random
    except ImportError:
        return 0
    from torch.overrides import _get_current_function_mode_stack

    patched = 0
    for cls_name in ("CheckpointFunction", "CheckpointWithoutOutputFunction"):
        cls = getattr(mcore_random, cls_name, None)
        original = vars(cls).get("backward") if cls is not None else None
        if original is None or getattr(original, "_rcpa_cpu_shim", False):
            continue
        inner = original.__func__ if isinstance(original, staticmethod) else original

        def backward(ctx, *grads, _inner=inner):
            if _MODE is None or any(m is _MODE for m in _get_current_function_mode_stack()):
                return _inner(ctx, *grads)
            with _MODE:
                return _inner(ctx, *grads)

        backward._rcpa_cpu_shim = True
        _patch(cls, "backward", staticmethod(backward))
        patched += 1
    return patched


def _torch_cuda_patches() -> List[Tuple[Any, str, Callable]]:
    cuda, cuda_random = torch.cuda, torch.cuda.random
    rng = {
        "get_rng_state": _get_rng_state,
        "set_rng_state": _set_rng_state,
        "get_rng_state_all": _get_rng_state_all,
        "set_rng_state_all": _set_rng_state_all,
        "manual_seed": _manual_seed,
        "manual_seed_all": _manual_seed,
    }
    patches = [(owner, name, fn) for owner in (cuda, cuda_random) for name, fn in rng.items()]
    patches += [
        (cuda, "current_device", lambda: _CPU),
        (cuda, "synchronize", lambda device=None: None),
        (cuda, "Stream", _CpuStream),
        (cuda, "Event", _CpuEvent),
        (cuda, "current_stream", _current_stream),
        (cuda, "default_stream", _current_stream),
        (cuda, "set_stream", lambda stream: None),
        (cuda, "stream", _stream_context),
        # torch's argument parser rejects a stand-in stream before any torch function mode sees the call
        (torch.Tensor, "record_stream", _record_stream),
    ]
    return patches


def is_cpu_shim_installed() -> bool:
    return _MODE is not None


def install_cpu_shim() -> bool:
    """Make megatron-core runnable on this CPU-only process; returns whether the shim is (now) active.

    A no-op returning False when ``torch.cuda.is_available()``. Idempotent: a second call installs nothing
    new but re-scans ``sys.modules`` for megatron modules imported since that hold the CUDA-RNG helpers.
    Call it before building megatron models, in every process (and thread) that runs megatron code.
    """
    global _MODE
    if torch.cuda.is_available():
        return False
    if _MODE is None:
        for owner, name, fn in _torch_cuda_patches():
            _patch(owner, name, fn)
        mode = CudaToCpuMode()
        mode.__enter__()  # pushed for the rest of this thread's life (until uninstall_cpu_shim)
        _MODE = mode
    _patch_megatron_rng_references()
    _patch_megatron_checkpoint_backward()
    return True


def uninstall_cpu_shim() -> None:
    """Undo :func:`install_cpu_shim` (restore every patched attribute, pop the mode). Safe to call twice.

    Must run on the thread that installed the shim, with no torch function mode pushed on top of it since.
    """
    global _MODE
    if _MODE is not None:
        _MODE.__exit__(None, None, None)
        _MODE = None
    while _PATCHES:
        owner, name, previous, had = _PATCHES.pop()
        if had:
            setattr(owner, name, previous)
        else:
            delattr(owner, name)
