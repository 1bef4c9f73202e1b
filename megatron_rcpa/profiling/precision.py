"""Which precisions a profile runs, checked before anything is built; and the FP8 (Transformer Engine) setup.

BF16 runs everywhere (the CPU included). FP8 runs through Transformer Engine: megatron's TE layer spec
(``get_gpt_layer_with_transformer_engine_spec``) and the ``fp8`` / ``fp8_recipe`` options of megatron's
``TransformerConfig``, which make every transformer layer run its GEMMs under TE's FP8 autocast (the LM head,
the embedding and the HF vision tower stay BF16). TE is imported lazily; without it (or without a GPU) FP8
stops with :class:`PrecisionError`.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Dict, List, Optional

from megatron_rcpa.profiling.peaks import DeviceInfo, is_blackwell

__all__ = [
    "FP8_FORMATS",
    "FP8_RECIPES",
    "PRECISIONS",
    "PrecisionError",
    "PrecisionRun",
    "check_fp8_available",
    "fp8_config_overrides",
    "parse_precisions",
    "te_layer_spec",
    "transformer_engine_available",
]

PRECISIONS = ("bf16", "fp8")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
FP8_FORMATS = ("hybrid", "e4m3")
DEFAULT_FP8_RECIPE = "delayed"  # megatron-core's default
# E4M3 forward / E5M2 gradients ("hybrid") for the per-tensor recipes; the block-scaled ones use E4M3 throughout
_DEFAULT_FORMAT = {"delayed": "hybrid", "tensorwise": "hybrid", "blockwise": "e4m3", "mxfp8": "e4m3"}
TE_MISSING = ("FP8 needs transformer-engine on a GPU image (e.g. the NGC PyTorch container); {why}. "
              "Use --precision bf16 here.")


class PrecisionError(ValueError):
    """A precision / FP8 recipe that is invalid or cannot run on this machine."""


@dataclasses.dataclass(frozen=True)
class PrecisionRun:
    precision: str  # bf16 | fp8
    fp8_recipe: Optional[str] = None
    fp8_format: Optional[str] = None

    @property
    def label(self) -> str:
        return self.precision if self.precision == "bf16" else f"fp8-{self.fp8_recipe}"


def _check_precision(value: str, flag: str) -> str:
    if value not in PRECISIONS:
        raise PrecisionError(f"{flag} {value!r}: expected one of {', '.join(PRECISIONS)}")
    return value


def parse_precisions(precision: str = "bf16", fp8_recipe: Optional[str] = None, compare: Optional[str] = None,
                     fp8_format: Optional[str] = None) -> List[PrecisionRun]:
    """The runs asked for by ``--precision`` / ``--fp8-recipe`` / ``--fp8-format`` / ``--compare a,b``.

    ``--compare`` replaces ``--precision``; ``--fp8-recipe`` and ``--fp8-format`` need an fp8 run.
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
    if fp8_recipe is not None and fp8_recipe not in FP8_RECIPES:
        raise PrecisionError(f"--fp8-recipe {fp8_recipe!r}: expected one of {', '.join(FP8_RECIPES)}")
    if fp8_format is not None and fp8_format not in FP8_FORMATS:
        raise PrecisionError(f"--fp8-format {fp8_format!r}: expected one of {', '.join(FP8_FORMATS)}")
    if "fp8" not in precisions:
        for flag, value in (("--fp8-recipe", fp8_recipe), ("--fp8-format", fp8_format)):
            if value is not None:
                raise PrecisionError(f"{flag} {value} applies to fp8 only, but the precision is "
                                     f"{','.join(precisions)}; add --precision fp8 (or --compare bf16,fp8)")
    runs = []
    for p in precisions:
        if p == "bf16":
            runs.append(PrecisionRun("bf16"))
        else:
            recipe = fp8_recipe or DEFAULT_FP8_RECIPE
            runs.append(PrecisionRun("fp8", recipe, fp8_format or _DEFAULT_FORMAT[recipe]))
    return runs


def transformer_engine_available() -> Optional[str]:
    """None if ``transformer_engine.pytorch`` imports, else why not (never raises)."""
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as exc:  # noqa: BLE001 - an installed-but-unloadable TE raises OSError & co, not ImportError
        return f"'import transformer_engine.pytorch' failed ({type(exc).__name__}: {exc})"
    return None


def check_fp8_available(runs: List[PrecisionRun], device: DeviceInfo, te_error: Optional[str] = "unchecked") -> None:
    """Raise PrecisionError if an FP8 run cannot run here: MXFP8 off Blackwell (naming the card), no GPU, no TE.

    ``te_error`` is :func:`transformer_engine_available`'s answer; "unchecked" (the default) asks it, lazily.
    """
    fp8 = [r for r in runs if r.precision == "fp8"]
    if not fp8:
        return
    for run in fp8:
        if run.fp8_recipe == "mxfp8" and not is_blackwell(device):
            card = device.name if device.kind == "cuda" else "a CPU (no CUDA device)"
            cap = f", compute capability {device.capability[0]}.{device.capability[1]}" if device.capability else ""
            raise PrecisionError(f"--fp8-recipe mxfp8 needs a Blackwell GPU (compute capability 10.x, e.g. B200); "
                                 f"this device is {card}{cap}. Use delayed, tensorwise or blockwise here.")
    if device.kind != "cuda":
        raise PrecisionError(TE_MISSING.format(why="this machine has no CUDA device"))
    if te_error == "unchecked":
        te_error = transformer_engine_available()
    if te_error is not None:
        raise PrecisionError(TE_MISSING.format(why=te_error))


def fp8_config_overrides(run: PrecisionRun) -> Dict[str, Any]:
    """megatron ``TransformerConfig`` options of an FP8 run (empty for bf16)."""
    if run.precision != "fp8":
        return {}
    overrides: Dict[str, Any] = {"fp8": run.fp8_format, "fp8_recipe": run.fp8_recipe}
    if run.fp8_recipe == "delayed":
        overrides.update(fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    return overrides


def te_layer_spec(qk_layernorm: bool = False):
    """megatron's Transformer Engine GPT layer spec (FP8-capable linear layers, TE norms and attention)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
