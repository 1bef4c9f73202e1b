"""Shared text helpers for the metric rewards: tokenisation, n-grams, and the ``<answer>`` span."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, List, Optional, Sequence, Tuple

_WORD_RE = re.compile(r"[a-z0-9]+")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def tokenize(text: str) -> List[str]:
    """Lower-case alphanumeric word tokens; punctuation and other symbols separate words and are dropped
    (``"A man's hat."`` -> ``["a", "man", "s", "hat"]``). Used by BLEU, CIDEr-D and ROUGE-L. It plays the role
    of the PTB tokenizer + punctuation removal of the COCO caption toolkit; scores can differ from that
    toolkit's on texts where the two tokenisations differ (e.g. contractions)."""
    return _WORD_RE.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> Counter:
    """Counts of the n-grams (tuples) of ``tokens``."""
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def answer_span(text: Optional[str]) -> str:
    """The content of the last ``<answer>...</answer>`` in ``text``, or the whole text when there is none."""
    if not text:
        return ""
    found = _ANSWER_TAG_RE.findall(text)
    return found[-1].strip() if found else text


def as_reference_list(ref: Any, index: int, reward: str) -> List[str]:
    """A reference given as a string or a list of strings, as a non-empty list; raises naming the sample."""
    from .registry import RewardError

    if ref is None:
        raise RewardError(f"{reward} needs a reference, sample {index} has none")
    refs = [ref] if isinstance(ref, str) else [str(r) for r in ref]
    if not refs:
        raise RewardError(f"{reward}: sample {index} has an empty list of references")
    return refs


def prepare_pairs(responses: Sequence[str], references: Sequence[Any], reward: str, use_answer_tag: bool
                  ) -> List[Tuple[str, List[str]]]:
    """(candidate, reference list) per sample, with the ``<answer>`` span taken from both when asked."""
    out = []
    for i, (resp, ref) in enumerate(zip(responses, references)):
        refs = as_reference_list(ref, i, reward)
        if use_answer_tag:
            out.append((answer_span(resp), [answer_span(r) for r in refs]))
        else:
            out.append((resp or "", refs))
    return out
