"""Which precisions a profile runs, checked before anything is built; FP8 through Transformer Engine or torchao.

BF16 runs everywhere (the CPU included). FP8 (``--precision fp8``, or ``--compare bf16,fp8``) runs through one of
two backends (``--fp8-backend``; default ``auto``: ``te`` when ``transformer_engine.pytorch`` imports, else
``torchao``), both set up by :mod:`megatron_rcpa.models.fp8` (``model.fp8`` of the trainer):

- ``te``: megatron's TE layer spec and the ``fp8`` / ``fp8_recipe`` options of its ``TransformerConfig``; every
  transformer layer runs its GEMMs under TE's FP8 autocast. Recipes ``delayed`` (default), ``tensorwise``,
  ``blockwise``, ``mxfp8`` (Blackwell); ``--fp8-format hybrid | e4m3``.
- ``torchao``: the local spec, its column/row-parallel linears' GEMMs through ``torchao.float8`` (recipes
  ``tensorwise`` (default), ``rowwise``; the formats follow the recipe).

The LM head, the embedding and the vision tower stay BF16 with either. Both are imported lazily; without a GPU
of compute capability 8.9+, or without the backend's package, FP8 stops with :class:`PrecisionError`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

from megatron_rcpa.models.fp8 import (
    DEFAULT_RECIPE,
    FP8_BACKENDS,
    MIN_CAPABILITY,
    TE_DEFAULT_FORMAT,
    TE_FORMATS,
    TE_RECIPES,
    TORCHAO_RECIPES,
    te_config_overrides,
    te_layer_spec,
    torchao_available,
    transformer_engine_available,
)
from megatron_rcpa.profiling.peaks import DeviceInfo, is_blackwell

__all__ = [
    "FP8_BACKENDS",
    "FP8_FORMATS",
    "FP8_RECIPES",
    "PRECISIONS",
    "PrecisionError",
    "PrecisionRun",
    "TORCHAO_RECIPES",
    "check_fp8_available",
    "fp8_config_overrides",
    "parse_precisions",
    "te_layer_spec",
    "torchao_available",
    "transformer_engine_available",
]

PRECISIONS = ("bf16", "fp8")
FP8_RECIPES = TE_RECIPES  # Transformer Engine's
FP8_FORMATS = TE_FORMATS
RECIPES = {"te": TE_RECIPES, "torchao": TORCHAO_RECIPES}
DEFAULT_FP8_RECIPE = DEFAULT_RECIPE["te"]  # megatron-core's default
TE_MISSING = ("FP8 needs transformer-engine on a GPU image (e.g. the NGC PyTorch container); {why}. "
              "Use --precision bf16 here, or --fp8-backend torchao on a GPU.")
TORCHAO_NO_GPU = ("FP8 through torchao needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+: L40, H100, "
                  "H200, B200); {why}: there is no FP8 matmul on a CPU. Use --precision bf16 here.")


class PrecisionError(ValueError):
    """A precision / FP8 backend or recipe that is invalid or cannot run on this machine."""


@dataclasses.dataclass(frozen=True)
class PrecisionRun:
    precision: str  # bf16 | fp8
    fp8_recipe: Optional[str] = None
    fp8_format: Optional[str] = None  # Transformer Engine only
    fp8_backend: Optional[str] = None  # te | torchao (an fp8 run without one is a TE run, as before torchao)

    def __post_init__(self) -> None:
        if self.precision == "fp8" and self.fp8_backend is None:
            object.__setattr__(self, "fp8_backend", "te")

    @property
    def label(self) -> str:
        if self.precision == "bf16":
            return "bf16"
        return f"fp8-{self.fp8_recipe}" if self.fp8_backend == "te" else f"fp8-{self.fp8_backend}-{self.fp8_recipe}"


def _check_precision(value: str, flag: str) -> str:
    if value not in PRECISIONS:
        raise PrecisionError(f"{flag} {value!r}: expected one of {', '.join(PRECISIONS)}")
    return value


def parse_precisions(precision: str = "bf16", fp8_recipe: Optional[str] = None, compare: Optional[str] = None,
                     fp8_format: Optional[str] = None, fp8_backend: Optional[str] = None,
                     te_error: Optional[str] = "unchecked") -> List[PrecisionRun]:
    """The runs asked for by ``--precision`` / ``--fp8-backend`` / ``--fp8-recipe`` / ``--fp8-format`` /
    ``--compare a,b``.

    ``--compare`` replaces ``--precision``; the ``--fp8-*`` flags need an fp8 run. ``--fp8-backend auto`` (the
    default) is ``te`` when Transformer Engine imports (``te_error`` None; "unchecked" asks
    :func:`transformer_engine_available`), else ``torchao``; the recipe must be one of that backend's.
    """
    if compare is not None:
        names = [c.strip() for c in compare.split(",") if c.strip()]
        if len(names) < 2:
            raise PrecisionError(f"--compare {compare!r}: expected at least two comma-separated precisions, "
                                 f"e.g. bf16,fp8 (allowed: {', '.join(PRECISIONS)})")
        if len(set(names)) != len(names):
            raise PrecisionError(f"--compare {compare!r}: a precision is listed twice")
        precisions = [_check_precision(n, "--compare") for n in names]
    else:
        precisions = [_check_precision(precision, "--precision")]
    if fp8_backend is not None and fp8_backend not in FP8_BACKENDS:
        raise PrecisionError(f"--fp8-backend {fp8_backend!r}: expected one of {', '.join(FP8_BACKENDS)}")
    all_recipes = tuple(dict.fromkeys(TE_RECIPES + TORCHAO_RECIPES))
    if fp8_recipe is not None and fp8_recipe not in all_recipes:
        raise PrecisionError(f"--fp8-recipe {fp8_recipe!r}: expected one of {', '.join(TE_RECIPES)} (te) or "
                             f"{', '.join(TORCHAO_RECIPES)} (torchao)")
    if fp8_format is not None and fp8_format not in FP8_FORMATS:
        raise PrecisionError(f"--fp8-format {fp8_format!r}: expected one of {', '.join(FP8_FORMATS)}")
    if "fp8" not in precisions:
        for flag, value in (("--fp8-backend", fp8_backend), ("--fp8-recipe", fp8_recipe),
                            ("--fp8-format", fp8_format)):
            if value is not None:
                raise PrecisionError(f"{flag} {value} applies to fp8 only, but the precision is "
                                     f"{','.join(precisions)}; add --precision fp8 (or --compare bf16,fp8)")
        return [PrecisionRun("bf16") for _ in precisions]
    backend = fp8_backend or "auto"
    how = ""
    if backend == "auto":
        if te_error == "unchecked":
            te_error = transformer_engine_available()
        backend = "te" if te_error is None else "torchao"
        how = f" (--fp8-backend auto chose {backend}: " + (
            "transformer_engine imports)" if te_error is None else "transformer_engine does not import)")
    if fp8_recipe is not None and fp8_recipe not in RECIPES[backend]:
        raise PrecisionError(f"--fp8-recipe {fp8_recipe}: the {backend} backend{how} has the recipes "
                             f"{', '.join(RECIPES[backend])}")
    if fp8_format is not None and backend != "te":
        raise PrecisionError(f"--fp8-format {fp8_format} applies to the te backend only; torchao's formats follow "
                             f"--fp8-recipe (tensorwise: E4M3 forward, E5M2 gradients; rowwise: E4M3){how}")
    recipe = fp8_recipe or DEFAULT_RECIPE[backend]
    fmt = (fp8_format or TE_DEFAULT_FORMAT[recipe]) if backend == "te" else None
    return [PrecisionRun("bf16") if p == "bf16" else PrecisionRun("fp8", recipe, fmt, backend) for p in precisions]


def check_fp8_available(runs: List[PrecisionRun], device: DeviceInfo, te_error: Optional[str] = "unchecked",
                        torchao_error: Optional[str] = "unchecked") -> None:
    """Raise PrecisionError if an FP8 run cannot run here: no GPU (every CPU), a GPU without FP8 tensor cores,
    MXFP8 off Blackwell (naming the card), the backend's package missing.

    ``te_error`` / ``torchao_error`` are :func:`transformer_engine_available` / :func:`torchao_available`'s
    answers; "unchecked" (the default) asks them, lazily.
    """
    fp8 = [r for r in runs if r.precision == "fp8"]
    for run in fp8:
        if run.fp8_recipe == "mxfp8" and not is_blackwell(device):
            card = device.name if device.kind == "cuda" else "a CPU (no CUDA device)"
            cap = f", compute capability {device.capability[0]}.{device.capability[1]}" if device.capability else ""
            raise PrecisionError(f"--fp8-recipe mxfp8 needs a Blackwell GPU (compute capability 10.x, e.g. B200); "
                                 f"this device is {card}{cap}. Use delayed, tensorwise or blockwise here.")
    for backend in dict.fromkeys(r.fp8_backend for r in fp8):
        if device.kind != "cuda":
            why = "this machine has no CUDA device"
            raise PrecisionError(TE_MISSING.format(why=why) if backend == "te" else TORCHAO_NO_GPU.format(why=why))
        if device.capability is not None and tuple(device.capability) < MIN_CAPABILITY:
            raise PrecisionError(f"FP8 ({backend}) needs compute capability 8.9+ (L40, H100, H200, B200); this "
                                 f"device is {device.name}, compute capability {device.capability[0]}."
                                 f"{device.capability[1]}. Use --precision bf16 here.")
        if backend == "te":
            if te_error == "unchecked":
                te_error = transformer_engine_available()
            if te_error is not None:
                raise PrecisionError(TE_MISSING.format(why=te_error))
        else:
            if torchao_error == "unchecked":
                torchao_error = torchao_available()
            if torchao_error is not None:
                raise PrecisionError(f"--fp8-backend torchao: {torchao_error}")


def fp8_config_overrides(run: PrecisionRun) -> Dict[str, Any]:
    """megatron ``TransformerConfig`` options of an FP8 run (empty for bf16, and for torchao, which replaces the
    linears' GEMMs instead: :func:`megatron_rcpa.models.fp8.enable_torchao_fp8`)."""
    if run.precision != "fp8" or run.fp8_backend != "te":
        return {}
    return te_config_overrides(run.fp8_recipe, run.fp8_format)

