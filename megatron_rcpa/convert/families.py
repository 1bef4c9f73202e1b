"""The converters' view of the model-family registry (:mod:`megatron_rcpa.models.families`): lookups that
raise :class:`~megatron_rcpa.convert.errors.ConversionError`, the converters' one error type.

A family's converter table, HF aliases, layouts and TP checks are fields of its record
(:class:`~megatron_rcpa.models.families.Family`, here also named ``ModelFamily``); adding a family is one
record in its own module under ``megatron_rcpa/models/families/``.
"""

from __future__ import annotations

from typing import Any, Dict

from megatron_rcpa.convert.errors import ConversionError
from megatron_rcpa.models import families as _registry
from megatron_rcpa.models.families import Family as ModelFamily

__all__ = ["ModelFamily", "family_by_name", "family_for_config"]


def family_by_name(name: str) -> ModelFamily:
    """The convertible family ``name`` (ConversionError naming the known ones otherwise)."""
    known = [n for n in _registry.names() if _registry.get(n).table is not None]
    if name not in known:
        raise ConversionError(f"unknown model family {name!r}; known: {sorted(known)}")
    return _registry.get(name)


def family_for_config(config: Dict[str, Any]) -> ModelFamily:
    """The family of an HF ``config.json`` dict, from its ``architectures`` (else its ``model_type``)."""
    try:
        return _registry.for_hf_config(config)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
