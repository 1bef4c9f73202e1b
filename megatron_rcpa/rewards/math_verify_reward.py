"""``math_verify``: the final answer checked by Hugging Face's ``math-verify`` package (optional extra
``pip install "megatron-rcpa[math]"``), next to our own ``math_answer`` (the default, no dependency).

math-verify parses LaTeX / plain expressions into sympy and compares them symbolically; it bounds each parse
and comparison with ``signal.alarm``, which only works in the main thread of the main interpreter, so this
reward refuses to run elsewhere (a clear error, not a hang). ``timeout_s`` is its per-call budget; a sample
that times out or fails to parse scores 0.
"""

from __future__ import annotations

import threading
from typing import Any, List, Optional, Sequence

from .registry import register_reward


def _require_math_verify():
    try:
        import math_verify
    except ImportError as exc:
        raise ImportError("reward 'math_verify' needs the math-verify package: pip install 'megatron-rcpa[math]' "
                          "(or use reward.name=math_answer, which needs nothing)") from exc
    return math_verify


@register_reward("math_verify")
class MathVerifyReward:
    """1.0 when math-verify finds the response's final answer equal to the reference, else 0.0."""

    def __init__(self, timeout_s: int = 5, boxed_only: bool = False) -> None:
        self.mv = _require_math_verify()
        if int(timeout_s) < 1:
            raise ValueError(f"math_verify: timeout_s = {timeout_s} must be an integer >= 1 (SIGALRM seconds)")
        self.timeout_s = int(timeout_s)
        self.boxed_only = bool(boxed_only)

    def _parse(self, text: str, gold: bool):
        mv = self.mv
        if self.boxed_only and not gold:
            configs = [mv.LatexExtractionConfig(boxed_match_priority=0)]
        else:
            configs = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
        return mv.parse(text, extraction_config=configs, parsing_timeout=self.timeout_s)

    def __call__(self, responses: Sequence[str], references: Sequence[Optional[Any]], **_: Any) -> List[float]:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("reward 'math_verify' must run in the main thread: math-verify times out with "
                               "SIGALRM, which Python delivers only there")
        out: List[float] = []
        for response, reference in zip(responses, references):
            if reference is None:
                out.append(0.0)
                continue
            ref = reference if isinstance(reference, str) else str(reference[0] if reference else "")
            gold = self._parse(ref if "$" in ref or "\\" in ref else f"${ref}$", gold=True)
            answer = self._parse(response, gold=False)
            ok = bool(gold) and bool(answer) and self.mv.verify(gold, answer, timeout_seconds=self.timeout_s)
            out.append(1.0 if ok else 0.0)
        return out
