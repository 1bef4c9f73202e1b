"""FP8 training of the decoder's tensor-parallel linears: Transformer Engine when it is installed, else torchao.

``model.fp8`` (:class:`megatron_rcpa.train.config.Fp8Config`) selects it: ``enabled``, ``backend`` (``auto``: ``te``
when ``transformer_engine.pytorch`` imports, else ``torchao``) and ``recipe``.

- **te**: megatron's Transformer Engine layer spec and the ``fp8`` / ``fp8_recipe`` options of its
  ``TransformerConfig`` (recipes ``delayed`` (default), ``tensorwise``, ``blockwise``, ``mxfp8`` (Blackwell)).
  TE names its parameters differently from the local spec, so a converted checkpoint cannot be loaded into it.
- **torchao** (``pip install torchao==0.18.0``, the ``fp8`` extra): the local spec stays as it is; every megatron
  ``ColumnParallelLinear`` / ``RowParallelLinear`` inside the language model's transformer layers (attention QKV
  and output projection, MLP fc1 / fc2) runs its three GEMMs (output, grad input, grad weight) through torchao's
  float8 matmul (``torchao.float8``: dynamic scaling, ``torch._scaled_mm`` on the GPU). Recipes: ``tensorwise``
  (default: one scale per tensor; E4M3 for inputs and weights, E5M2 for gradients) and ``rowwise`` (one scale per
  row, power-of-two scales, E4M3 throughout). Only the GEMM is replaced (the module's ``_forward_impl``): the
  weight stays the same ``Parameter`` (optimizer, DDP, checkpoints see no difference; state-dict names are
  unchanged), and the tensor-parallel communication is megatron's own (sequence parallel: all-gather of the input
  forward / reduce-scatter of its gradient backward; otherwise the column-parallel input-gradient all-reduce;
  row-parallel output reductions stay in megatron's ``forward``). Under sequence parallelism the gathered input
  is kept for backward (megatron's own linear keeps the shard and gathers it again).

What stays in BF16 with either backend: the embedding, the LM head (output layer), the norms, core attention,
and the vision tower and projector of the VLMs.

FP8 matmuls need a CUDA GPU with FP8 tensor cores (compute capability 8.9+: L40, H100, H200, B200); there is
none on a CPU and :func:`check_fp8_device` says so. The CPU tests check the wiring with torchao's emulation
(the same casts, the matmul in fp32) through :func:`emulate_fp8_for_tests`, never used by training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import types
from typing import Any, Dict, List, Optional, Tuple

import torch

__all__ = [
    "FP8_BACKENDS",
    "TE_RECIPES",
    "TORCHAO_RECIPES",
    "TORCHAO_VERSION",
    "Fp8Error",
    "check_fp8_device",
    "emulate_fp8_for_tests",
    "emulating",
    "enable_torchao_fp8",
    "fp8_linear",
    "fp8_module_names",
    "resolve_backend",
    "resolve_fp8",
    "resolve_recipe",
    "te_config_overrides",
    "te_layer_spec",
    "torchao_available",
    "torchao_float8_config",
    "transformer_engine_available",
]

FP8_BACKENDS = ("auto", "te", "torchao")
TE_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
TORCHAO_RECIPES = ("tensorwise", "rowwise")
DEFAULT_RECIPE = {"te": "delayed", "torchao": "tensorwise"}
TORCHAO_VERSION = "0.18.0"  # the version this module is written against (torchao.float8's matmul function)
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.x)
_ALIGN = 16  # torch._scaled_mm: the weight's dimensions must be multiples of 16

_EMULATE = False  # set only by emulate_fp8_for_tests()


class Fp8Error(ValueError):
    """FP8 asked for where it cannot run, or with a backend / recipe that does not exist (the message says which)."""


# ------------------------------------------------------------------------------------------ availability
def transformer_engine_available() -> Optional[str]:
    """None if ``transformer_engine.pytorch`` imports, else why not (never raises)."""
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as exc:  # noqa: BLE001 - an installed-but-unloadable TE raises OSError & co, not ImportError
        return f"'import transformer_engine.pytorch' failed ({type(exc).__name__}: {exc})"
    return None


def torchao_available() -> Optional[str]:
    """None if ``torchao.float8`` imports, else why not (never raises)."""
    try:
        importlib.import_module("torchao.float8.float8_linear")
    except Exception as exc:  # noqa: BLE001
        return (f"'import torchao.float8' failed ({type(exc).__name__}: {exc}); install it with "
                f"pip install torchao=={TORCHAO_VERSION} (or pip install 'megatron-rcpa[fp8]')")
    return None


def resolve_backend(backend: str, te_error: Optional[str] = "unchecked", where: str = "model.fp8.backend") -> str:
    """``auto`` -> ``te`` when Transformer Engine imports, else ``torchao``; ``te`` / ``torchao`` as given.

    ``te_error`` is :func:`transformer_engine_available`'s answer; "unchecked" (the default) asks it, lazily.
    """
    if backend not in FP8_BACKENDS:
        raise Fp8Error(f"{where} = {backend!r} is out of range: expected one of "
                       + ", ".join(repr(b) for b in FP8_BACKENDS))
    if backend != "auto":
        return backend
    if te_error == "unchecked":
        te_error = transformer_engine_available()
    return "te" if te_error is None else "torchao"


def resolve_recipe(backend: str, recipe: Optional[str], where: str = "model.fp8.recipe") -> str:
    """The recipe of a resolved backend: ``recipe`` checked against the backend's, or its default."""
    allowed = TE_RECIPES if backend == "te" else TORCHAO_RECIPES
    if recipe is None:
        return DEFAULT_RECIPE[backend]
    if recipe not in allowed:
        raise Fp8Error(f"{where} = {recipe!r} is out of range for the {backend} backend: expected one of "
                       + ", ".join(repr(r) for r in allowed))
    return recipe


def check_fp8_device(backend: str, device: Optional[torch.device] = None) -> None:
    """Raise :class:`Fp8Error` unless FP8 GEMMs can run here: a CUDA device of compute capability 8.9+ (and, for
    torchao, the package itself). TE's own requirements are checked by the caller (it imports TE)."""
    if not torch.cuda.is_available():
        raise Fp8Error(f"FP8 ({backend}) needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+: L40, "
                       "H100, H200, B200); this machine has no CUDA device, and there is no FP8 matmul on a CPU. "
                       "Set model.fp8.enabled=false (BF16) here.")
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    cap = torch.cuda.get_device_capability(index)
    if tuple(cap) < MIN_CAPABILITY:
        raise Fp8Error(f"FP8 ({backend}) needs compute capability 8.9+ (L40, H100, H200, B200); this device is "
                       f"{torch.cuda.get_device_name(index)}, compute capability {cap[0]}.{cap[1]}. "
                       "Set model.fp8.enabled=false (BF16) here.")
    if backend == "torchao":
        why = torchao_available()
        if why is not None:
            raise Fp8Error(f"model.fp8.backend = 'torchao': {why}")


@contextlib.contextmanager
def emulate_fp8_for_tests():
    """Tests only: torchao's FP8 casts with the matmul emulated in fp32, so that the wiring (which GEMMs, which
    scales, the tensor-parallel communication) is checked on a CPU. Not a training mode: nothing is faster."""
    global _EMULATE
    before, _EMULATE = _EMULATE, True
    try:
        yield
    finally:
        _EMULATE = before


def emulating() -> bool:
    """True inside :func:`emulate_fp8_for_tests`."""
    return _EMULATE


def resolve_fp8(fp8) -> Tuple[Optional[str], Optional[str]]:
    """``model.fp8`` (:class:`~megatron_rcpa.train.config.Fp8Config`) resolved: (backend, recipe), or (None, None)
    when it is off. Raises :class:`Fp8Error` where FP8 cannot run: no CUDA device of compute capability 8.9+
    (every CPU), torchao or Transformer Engine missing, a recipe the resolved backend does not have."""
    if not fp8.enabled:
        return None, None
    te_error = transformer_engine_available() if fp8.backend in ("auto", "te") else None
    backend = resolve_backend(fp8.backend, te_error=te_error)
    recipe = resolve_recipe(backend, fp8.recipe)
    if not (backend == "torchao" and _EMULATE):  # (the CPU tests' torchao emulation)
        check_fp8_device(backend)
    if backend == "te" and te_error is not None:
        raise Fp8Error(f"model.fp8.backend = 'te': {te_error}; use model.fp8.backend=torchao (or auto)")
    return backend, recipe


# ------------------------------------------------------------------------------------------ Transformer Engine
TE_FORMATS = ("hybrid", "e4m3")
# E4M3 forward / E5M2 gradients ("hybrid") for the per-tensor recipes; the block-scaled ones use E4M3 throughout
TE_DEFAULT_FORMAT = {"delayed": "hybrid", "tensorwise": "hybrid", "blockwise": "e4m3", "mxfp8": "e4m3"}


def te_config_overrides(recipe: str, fp8_format: Optional[str] = None) -> Dict[str, Any]:
    """megatron ``TransformerConfig`` options of a Transformer Engine FP8 run."""
    if recipe not in TE_RECIPES:
        raise Fp8Error(f"Transformer Engine FP8 recipe {recipe!r}: expected one of {', '.join(TE_RECIPES)}")
    overrides: Dict[str, Any] = {"fp8": fp8_format or TE_DEFAULT_FORMAT[recipe], "fp8_recipe": recipe}
    if recipe == "delayed":
        overrides.update(fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    return overrides


def te_layer_spec(qk_layernorm: bool = False):
    """megatron's Transformer Engine GPT layer spec (FP8-capable linear layers, TE norms and attention)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)


# ------------------------------------------------------------------------------------------ torchao GEMM
@functools.cache
def torchao_float8_config(recipe: str, emulate: bool = False):
    """torchao's ``Float8LinearConfig`` of a recipe (``tensorwise`` | ``rowwise``)."""
    if recipe not in TORCHAO_RECIPES:
        raise Fp8Error(f"torchao FP8 recipe {recipe!r}: expected one of {', '.join(TORCHAO_RECIPES)}")
    from torchao.float8 import Float8LinearConfig

    return dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)


@functools.cache
def _mm_config(recipe: str, emulate: bool, pad_tokens: bool):
    """torchao's per-GEMM settings (output, grad input, grad weight). ``pad_tokens``: the grad-weight GEMM's inner
    dimension is the token count, zero-padded to a multiple of 16 when it is not one (the other inner dimensions
    are the weight's, checked when the module is converted)."""
    from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig

    c = torchao_float8_config(recipe, emulate)
    return LinearMMConfig(
        ScaledMMConfig(emulate, c.gemm_config_output.use_fast_accum, False, False),
        ScaledMMConfig(emulate, c.gemm_config_grad_input.use_fast_accum, False, False),
        ScaledMMConfig(emulate, c.gemm_config_grad_weight.use_fast_accum, False, pad_tokens),
    )


def fp8_linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], recipe: str,
               emulate: bool = False) -> torch.Tensor:
    """``input @ weight.T (+ bias)`` with the three GEMMs of forward and backward in float8 (torchao's
    ``matmul_with_hp_or_float8_args``: dynamic scales from the current tensors). ``input`` [..., K], ``weight``
    [N, K]; the output has ``input``'s dtype; gradients flow to ``weight`` itself."""
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

    tokens = input.numel() // max(input.shape[-1], 1)
    mm = _mm_config(recipe, emulate, pad_tokens=bool(tokens % _ALIGN) and not emulate)
    out = matmul_with_hp_or_float8_args.apply(input, weight.t(), mm, torchao_float8_config(recipe, emulate))
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out


def _torchao_forward_impl(self, input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                          sequence_parallel=False, grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None,
                          **unused: Any):
    """Replaces megatron's ``_forward_impl`` (``linear_with_grad_accumulation_and_async_allreduce``) of a
    column/row-parallel linear: the same communication through megatron's mappings, the GEMMs in float8."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    if gradient_accumulation_fusion:
        raise Fp8Error(f"{self.rcpa_fp8_name}: torchao FP8 does not support gradient_accumulation_fusion (megatron "
                       "TransformerConfig); it is off in this project's configs")
    if grad_output_buffer is not None:
        raise Fp8Error(f"{self.rcpa_fp8_name}: torchao FP8 does not support defer_embedding_wgrad_compute")
    group = tp_group if tp_group is not None else getattr(self, "tp_group", None)
    if sequence_parallel:  # forward: all-gather over the sequence; backward: reduce-scatter of the input grad
        input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=group)
    elif allreduce_dgrad:  # forward: identity; backward: all-reduce of the input grad over TP
        input = copy_to_tensor_model_parallel_region(input, group=group)
    return fp8_linear(input, weight, bias, self.rcpa_fp8_recipe, emulate=self.rcpa_fp8_emulate)


def _tp_linear_classes() -> Tuple[type, ...]:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    return ColumnParallelLinear, RowParallelLinear


def _decoder_of(policy: torch.nn.Module) -> Tuple[str, torch.nn.Module]:
    lm = getattr(policy, "language_model", None)
    decoder = getattr(lm, "decoder", None) if lm is not None else None
    if decoder is None:
        raise Fp8Error(f"FP8: {type(policy).__name__} has no language_model.decoder (a megatron GPTModel's "
                       "transformer block): nothing to convert")
    return "language_model.decoder", decoder


def fp8_module_names(policy: torch.nn.Module) -> List[str]:
    """The names (in ``policy.named_modules()``) of the linears running their GEMMs in float8 (torchao)."""
    return [name for name, m in policy.named_modules() if getattr(m, "rcpa_fp8_recipe", None) is not None]


def enable_torchao_fp8(policy: torch.nn.Module, recipe: str = "tensorwise", *, emulate: Optional[bool] = None
                       ) -> List[str]:
    """Make every column/row-parallel linear of ``policy.language_model.decoder`` (this pipeline stage's
    transformer layers) run its GEMMs in float8 through torchao, in place; returns their names. The LM head, the
    embedding and any vision tower / projector are left alone (BF16).

    ``emulate`` (None: only inside :func:`emulate_fp8_for_tests`) runs the casts on a CPU with the matmul in fp32;
    without it a CUDA device of compute capability 8.9+ is required (:class:`Fp8Error` otherwise)."""
    if emulate is None:
        emulate = _EMULATE
    if recipe not in TORCHAO_RECIPES:
        raise Fp8Error(f"model.fp8.recipe = {recipe!r} is out of range for the torchao backend: expected one of "
                       + ", ".join(repr(r) for r in TORCHAO_RECIPES))
    if not emulate:
        check_fp8_device("torchao")
    else:
        why = torchao_available()
        if why is not None:
            raise Fp8Error(f"model.fp8.backend = 'torchao': {why}")
    prefix, decoder = _decoder_of(policy)
    classes = _tp_linear_classes()
    converted = []
    for name, module in decoder.named_modules():
        if not isinstance(module, classes):
            continue
        full = f"{prefix}.{name}"
        if getattr(module, "rcpa_fp8_recipe", None) is not None:
            raise Fp8Error(f"FP8: {full} is already converted (recipe {module.rcpa_fp8_recipe})")
        if module.weight is None:
            raise Fp8Error(f"FP8: {full} has no weight of its own (skip_weight_param_allocation); not supported")
        n, k = module.weight.shape
        if n % _ALIGN or k % _ALIGN:
            raise Fp8Error(f"FP8: {full} has a [{n}, {k}] weight on this rank; torch._scaled_mm needs both "
                           f"dimensions to be multiples of {_ALIGN} (check the hidden / FFN sizes / TP)")
        module.rcpa_fp8_name = full
        module.rcpa_fp8_recipe = recipe
        module.rcpa_fp8_emulate = bool(emulate)
        module._forward_impl = types.MethodType(_torchao_forward_impl, module)
        converted.append(full)
    return converted

