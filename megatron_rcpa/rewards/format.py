"""Format reward ``format``: 1.0 when a response has the expected shape (a regular expression), else 0.0.

Presets (``preset=``), or any ``pattern=`` of your own (compiled with ``re.DOTALL``, tested with
``re.search``, so anchor it with ``\\A``/``\\Z`` when the whole response must match):

- ``think_answer``: exactly ``<think>...</think>`` then ``<answer>...</answer>`` and nothing else around them
  but whitespace; the tags do not nest or repeat.
- ``boxed``: a ``\\boxed{...}`` with a non-empty content somewhere.
- ``think_boxed``: a ``<think>...</think>`` block first, then text holding a ``\\boxed{...}``.
"""

from __future__ import annotations

import re
from typing import Any, List, Optional, Sequence

from .registry import register_reward

_NO_TAG = r"(?:(?!</?think>|</?answer>).)*"
FORMAT_PRESETS = {
    "think_answer": rf"\A\s*<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*\Z",
    "boxed": r"\\boxed\{[^{}\s][^\n]*\}",
    "think_boxed": rf"\A\s*<think>{_NO_TAG}</think>{_NO_TAG}\\boxed\{{[^{{}}\s][^\n]*\}}",
}

_COMPILED: dict = {}


def _compile(pattern: str) -> re.Pattern[str]:
    if pattern not in _COMPILED:
        try:
            _COMPILED[pattern] = re.compile(pattern, re.DOTALL)
        except re.error as exc:
            raise ValueError(f"format reward: invalid pattern {pattern!r}: {exc}") from exc
    return _COMPILED[pattern]


def format_ok(response: str, pattern: Optional[str] = None, preset: str = "think_answer") -> bool:
    """True when ``response`` matches ``pattern`` (or the ``preset``'s pattern)."""
    if pattern is None:
        if preset not in FORMAT_PRESETS:
            raise ValueError(f"format reward: unknown preset {preset!r}: expected one of {sorted(FORMAT_PRESETS)}")
        pattern = FORMAT_PRESETS[preset]
    return _compile(pattern).search(response or "") is not None


@register_reward("format")
def format_reward(responses: Sequence[str], references: Sequence[Any], *, pattern: Optional[str] = None,
                  preset: str = "think_answer", **_: Any) -> List[float]:
    """Reward: 1.0 per response of the expected shape, else 0.0; references are not used."""
    return [1.0 if format_ok(r, pattern, preset) else 0.0 for r in responses]
