"""Report metrics: ROUGE-L and token F1, and their rewards ``rouge_l`` and ``token_f1``.

**ROUGE-L** (Lin 2004), on :func:`~.text.tokenize` tokens: with LCS the longest common subsequence of the
candidate c and a reference r, P = LCS / |c|, R = LCS / |r| and

    F = (1 + beta^2) P R / (R + beta^2 P)

``beta`` = 1 by default (the F1 of the ``rouge-score`` package; the COCO caption toolkit uses 1.2). With
several references the best F counts (as ``rouge-score``; the COCO toolkit instead combines the best P and the
best R, which can differ; with one reference and beta = 1.2 the two agree). The LCS length uses a
bit-parallel algorithm (Hyyrö 2004) on Python integers, so long reports stay cheap.

**Token F1** (SQuAD evaluation): both texts normalised (lower case, punctuation removed, the articles
a/an/the removed, whitespace collapsed), split on whitespace; with ``common`` the size of the multiset
intersection, P = common / |pred|, R = common / |ref|, F1 = 2PR / (P + R). Two empty texts score 1, one
empty text 0. With several references the best F1 counts.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any, List, Sequence, Union

from .registry import register_reward
from .text import prepare_pairs, tokenize

RefSet = Union[str, Sequence[str]]


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence of two token sequences (bit-parallel, O(|a| |b| / 64))."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    masks: dict = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(candidate: str, references: RefSet, beta: float = 1.0) -> float:
    """ROUGE-L F-measure of ``candidate`` against one or several references (the best one counts)."""
    refs = [references] if isinstance(references, str) else list(references)
    cand = tokenize(candidate)
    best = 0.0
    for ref in refs:
        r = tokenize(ref)
        lcs = lcs_length(cand, r)
        if lcs == 0:
            continue
        p, rec = lcs / len(cand), lcs / len(r)
        f = (1 + beta ** 2) * p * rec / (rec + beta ** 2 * p)
        best = max(best, f)
    return best


_PUNCT = set(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, references: RefSet) -> float:
    """SQuAD-style token F1 of ``prediction`` against one or several references (the best one counts)."""
    refs = [references] if isinstance(references, str) else list(references)
    pred = normalize_answer(prediction).split()
    best = 0.0
    for ref in refs:
        gold = normalize_answer(ref).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common == 0:
            continue
        p, r = common / len(pred), common / len(gold)
        best = max(best, 2 * p * r / (p + r))
    return best


@register_reward("rouge_l")
def rouge_l_reward(responses: Sequence[str], references: Sequence[Any], *, beta: float = 1.0,
                   use_answer_tag: bool = True, **_: Any) -> List[float]:
    """Reward: ROUGE-L F of each response (its ``<answer>`` span when ``use_answer_tag``) against its reference."""
    return [rouge_l(c, refs, beta) for c, refs in prepare_pairs(responses, references, "rouge_l", use_answer_tag)]


@register_reward("token_f1")
def token_f1_reward(responses: Sequence[str], references: Sequence[Any], *, use_answer_tag: bool = True,
                    **_: Any) -> List[float]:
    """Reward: SQuAD token F1 of each response (its ``<answer>`` span when ``use_answer_tag``)."""
    return [token_f1(c, refs) for c, refs in prepare_pairs(responses, references, "token_f1", use_answer_tag)]
