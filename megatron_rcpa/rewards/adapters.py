"""Reward functions written for verl or TRL, called through our batched contract (see :mod:`.registry`).

The trainer calls every reward as ``fn(responses, references, **sample_fields)`` with these per-rollout lists:

=================  ==========================================================================================
``prompts``        the sample's prompt text (the user turn)
``ids``            the sample id
``data_sources``   the sample's ``data_source`` (verl's column; "" when the data has none)
``extra_infos``    the sample's ``extra_info`` dict (verl's column; {} when none)
``all_references`` every reference of the sample (several captions, answers...), a list of strings
``meta``           the row's other fields (a dict)
=================  ==========================================================================================

Two foreign conventions are adapted to it:

- **verl** ``compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict`` (one
  sample per call; a dict return carries the reward under ``"score"``), as in verl's ``default_compute_score``
  and ``custom_reward_function``;
- **TRL** ``f(prompts, completions, **columns) -> list[float]`` (``GRPOTrainer``'s reward functions: batched;
  the dataset's other columns arrive as keyword lists). We pass ``ground_truth``/``solution``/``reference``
  (the references), ``data_source``, ``extra_info`` and every key of the rows' ``meta`` present in all rows.

:func:`detect_api` reads a function's signature: ``solution_str`` + ``ground_truth`` is verl, ``completions``
is TRL, anything else is ours. ``reward.api`` in the config forces one.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence

API_STYLES = ("auto", "rcpa", "verl", "trl")


def _parameters(fn: Callable) -> Optional[Dict[str, inspect.Parameter]]:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None


def detect_api(fn: Callable) -> str:
    """``"verl"``, ``"trl"`` or ``"rcpa"`` from the names of ``fn``'s parameters."""
    params = _parameters(fn)
    if params is None:
        return "rcpa"
    names = set(params)
    if {"solution_str", "ground_truth"} <= names:
        return "verl"
    if "completions" in names:
        return "trl"
    return "rcpa"


class VerlReward:
    """A verl ``compute_score`` called once per rollout."""

    def __init__(self, fn: Callable, name: str):
        self.fn = fn
        self.name = name
        self.takes_extra_info = "extra_info" in (_parameters(fn) or {}) or _has_var_keyword(fn)

    def __call__(self, responses: Sequence[str], references: Sequence[Any], **fields: Any) -> List[float]:
        n = len(responses)
        sources = fields.get("data_sources") or [""] * n
        infos = fields.get("extra_infos") or [{}] * n
        out: List[float] = []
        for i, (resp, ref) in enumerate(zip(responses, references)):
            kwargs: Dict[str, Any] = dict(data_source=sources[i], solution_str=resp, ground_truth=ref)
            if self.takes_extra_info:
                kwargs["extra_info"] = infos[i]
            value = self.fn(**kwargs)
            if isinstance(value, dict):
                if "score" not in value:
                    raise ValueError(f"reward {self.name!r} (verl style) returned a dict without a 'score' key "
                                     f"for sample {i}: keys {sorted(value)}")
                value = value["score"]
            out.append(value)
        return out


class TrlReward:
    """A TRL ``GRPOTrainer`` reward function: ``f(prompts, completions, **columns)``."""

    def __init__(self, fn: Callable, name: str):
        self.fn = fn
        self.name = name
        self.var_kw = _has_var_keyword(fn)
        self.accepted = set(_parameters(fn) or {})

    def __call__(self, responses: Sequence[str], references: Sequence[Any], **fields: Any) -> List[float]:
        n = len(responses)
        columns: Dict[str, Any] = {
            "ground_truth": list(references), "solution": list(references), "reference": list(references),
            "data_source": list(fields.get("data_sources") or [""] * n),
            "extra_info": list(fields.get("extra_infos") or [{}] * n),
        }
        metas = fields.get("meta") or []
        if metas and all(isinstance(m, dict) for m in metas):
            shared = set.intersection(*(set(m) for m in metas)) if metas else set()
            for key in sorted(shared):
                columns.setdefault(key, [m[key] for m in metas])
        if not self.var_kw:
            columns = {k: v for k, v in columns.items() if k in self.accepted}
        prompts = list(fields.get("prompts") or [""] * n)
        return list(self.fn(prompts=prompts, completions=list(responses), **columns))


def _has_var_keyword(fn: Callable) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in (_parameters(fn) or {}).values())


def adapt(fn: Callable, name: str, api: str = "auto") -> Callable:
    """``fn`` wrapped so that it follows our batched contract."""
    if api not in API_STYLES:
        raise ValueError(f"reward api {api!r}: expected one of {list(API_STYLES)}")
    style = detect_api(fn) if api == "auto" else api
    if style == "verl":
        return VerlReward(fn, name)
    if style == "trl":
        return TrlReward(fn, name)
    return fn
