"""The memory knobs of the decoder's megatron ``TransformerConfig``, from the training config, and what the
policies need to run with them on the local (non-TE) layer spec.

* :func:`transformer_overrides` - ``cfg.model.recompute_granularity`` / ``recompute_method`` /
  ``recompute_num_layers``, ``cfg.parallel.sequence_parallel``, ``cfg.parallel.num_layers_in_first_pipeline_stage``
  / ``..._last_...`` as ``TransformerConfig`` keywords (the ``config_overrides`` of every family's builder).
  The ``model.recompute_*`` fields are read with ``getattr`` and defaults, so a config without them works.
* :func:`check_knobs` - the same settings checked against a model's layer count and TP/PP before anything is
  built (ValueError naming the key).
* :func:`sequence_parallel_off` - sequence parallelism switched off for a block of code (KV-cache prefill /
  decode: a decode step holds one token, which ``s/TP`` cannot split; megatron's own inference does the same
  with ``set_model_to_sequence_parallel``).
* :func:`sequence_parallel_length` - a sequence length rounded up to a multiple of TP when sequence parallelism
  is on (the policy pads its input to it; pipeline schedules must be given the padded length).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Dict, Iterator, Optional

import torch

__all__ = [
    "RECOMPUTE_GRANULARITIES",
    "RECOMPUTE_METHODS",
    "check_knobs",
    "sequence_parallel_length",
    "sequence_parallel_off",
    "transformer_overrides",
]

RECOMPUTE_GRANULARITIES = ("none", "full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


def _recompute(model_cfg: Any) -> Dict[str, Any]:
    granularity = getattr(model_cfg, "recompute_granularity", "none") or "none"
    method = getattr(model_cfg, "recompute_method", None)
    num_layers = getattr(model_cfg, "recompute_num_layers", None)
    if granularity not in RECOMPUTE_GRANULARITIES:
        raise ValueError(f"model.recompute_granularity = {granularity!r}: expected one of "
                         f"{list(RECOMPUTE_GRANULARITIES)}")
    if granularity == "none":
        return {}
    if granularity == "selective":
        # megatron: selective recomputes the core attention of every layer; method / num_layers must be unset
        return {"recompute_granularity": "selective"}
    method = method or "uniform"
    if method not in RECOMPUTE_METHODS:
        raise ValueError(f"model.recompute_method = {method!r}: expected one of {list(RECOMPUTE_METHODS)}")
    num_layers = 1 if num_layers is None else num_layers
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"model.recompute_num_layers = {num_layers!r}: expected an integer >= 1")
    return {"recompute_granularity": "full", "recompute_method": method, "recompute_num_layers": int(num_layers)}


def transformer_overrides(cfg: Any) -> Dict[str, Any]:
    """``TransformerConfig`` keywords for the memory knobs of a training config (only those that are set):
    ``recompute_granularity`` (``model.recompute_granularity``: none | full | selective; full takes
    ``recompute_method``, default uniform, and ``recompute_num_layers``, default 1), ``sequence_parallel``
    and ``num_layers_in_first_pipeline_stage`` / ``num_layers_in_last_pipeline_stage`` (``parallel.*``)."""
    out = _recompute(getattr(cfg, "model", None))
    par = getattr(cfg, "parallel", None)
    if getattr(par, "sequence_parallel", False):
        out["sequence_parallel"] = True
    for key in ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"):
        value = getattr(par, key, None)
        if value is not None:
            out[key] = int(value)
    return out


def stage_layers(num_layers: int, pp: int, first: Optional[int] = None, last: Optional[int] = None) -> list:
    """The number of decoder layers of every pipeline stage (megatron's split: ``first`` / ``last`` on the end
    stages when given, the rest evenly); ValueError naming the setting that does not fit."""
    if pp == 1:
        if first is not None or last is not None:
            raise ValueError("parallel.num_layers_in_first/last_pipeline_stage need parallel.pp > 1, got pp=1")
        return [num_layers]
    for key, value in (("first", first), ("last", last)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"parallel.num_layers_in_{key}_pipeline_stage = {value!r}: expected an integer >= 1")
    if first is None and last is None:
        if num_layers % pp:
            raise ValueError(f"PP={pp} does not divide num_hidden_layers={num_layers} (set "
                             "parallel.num_layers_in_first_pipeline_stage / ..._last_... for uneven stages)")
        return [num_layers // pp] * pp
    rest = num_layers - (first or 0) - (last or 0)
    middle = pp - (first is not None) - (last is not None)
    if rest < 0 or (middle == 0 and rest != 0) or (middle > 0 and (rest == 0 or rest % middle)):
        raise ValueError(f"parallel.num_layers_in_first_pipeline_stage = {first}, ..._last_pipeline_stage = "
                         f"{last}: the other {num_layers} - {first or 0} - {last or 0} = {rest} of "
                         f"num_hidden_layers={num_layers} must split evenly (>= 1 each) over the other "
                         f"{middle} of PP={pp} stages")
    inner = [rest // middle] * middle if middle else []
    return ([first] if first is not None else []) + inner + ([last] if last is not None else [])


def check_knobs(overrides: Dict[str, Any], *, num_layers: int, tp: int, pp: int) -> None:
    """ValueError naming the setting of :func:`transformer_overrides`' result that the layout cannot hold."""
    if overrides.get("sequence_parallel") and tp == 1:
        raise ValueError("parallel.sequence_parallel = true needs parallel.tp > 1 (it splits the sequence over "
                         "the tensor-parallel ranks)")
    stages = stage_layers(num_layers, pp, overrides.get("num_layers_in_first_pipeline_stage"),
                          overrides.get("num_layers_in_last_pipeline_stage"))
    n = overrides.get("recompute_num_layers")
    if overrides.get("recompute_method") == "uniform" and n is not None and any(k % n for k in stages):
        # megatron's uniform method recomputes each stage in chunks of n layers (megatron-core 0.16 indexes past
        # a stage's last layer otherwise)
        raise ValueError(f"model.recompute_num_layers = {n} must divide the layers of every pipeline stage for "
                         f"model.recompute_method = uniform (stages hold {stages} layers); use a divisor or "
                         "recompute_method = block")


def sequence_parallel_length(config, seq_len: int) -> int:
    """``seq_len`` rounded up to a multiple of TP when ``config.sequence_parallel`` (else unchanged)."""
    if not getattr(config, "sequence_parallel", False):
        return int(seq_len)
    tp = int(config.tensor_model_parallel_size)
    return -(-int(seq_len) // tp) * tp


_SP_ATTRS = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")
_SP_HOLDERS: weakref.WeakKeyDictionary[torch.nn.Module, list] = weakref.WeakKeyDictionary()


def _sp_holders(model: torch.nn.Module) -> list:
    """(object, attribute) of every sequence-parallel flag in ``model``: its modules' TransformerConfigs and
    the flags modules copied at build time (the TP linears, the embedding). Found once per model."""
    holders = _SP_HOLDERS.get(model)
    if holders is None:
        seen, holders = set(), []
        for module in model.modules():
            config = getattr(module, "config", None)
            candidates = [(config, "sequence_parallel")] if hasattr(config, "sequence_parallel") else []
            candidates += [(module, a) for a in _SP_ATTRS if isinstance(getattr(module, a, None), bool)]
            for obj, attr in candidates:
                if (id(obj), attr) not in seen:
                    seen.add((id(obj), attr))
                    holders.append((obj, attr))
        _SP_HOLDERS[model] = holders
    return holders


@contextlib.contextmanager
def sequence_parallel_off(model: torch.nn.Module) -> Iterator[None]:
    """Run the block with sequence parallelism off in ``model`` (its TransformerConfigs and the modules that
    copied the flag at build time: the TP linears, the embedding); restored afterwards. A no-op when it is
    off already (nesting is fine)."""
    on = [(obj, attr) for obj, attr in _sp_holders(model) if getattr(obj, attr) is True]
    for obj, attr in on:
        setattr(obj, attr, False)
    try:
        yield
    finally:
        for obj, attr in on:
            setattr(obj, attr, True)
