"""Captioning metrics: CIDEr-D and BLEU-4, and their rewards ``cider_d`` and ``bleu4``.

Texts are tokenised by :func:`~.text.tokenize` (lower-case alphanumeric words, punctuation dropped).

**CIDEr-D** (Vedantam et al. 2015, the "-D" variant of the COCO caption toolkit), per candidate c with
references S = {s_1..s_m}::

    g_n(x)[w] = tf_x(w) * (log(N) - log(max(1, df(w))))      for each n-gram w of order n
    sim_n(c, s) = exp(-(l_c - l_s)^2 / (2 sigma^2)) * sum_w min(g_n(c)[w], g_n(s)[w]) * g_n(s)[w]
                                                          / (||g_n(c)|| * ||g_n(s)||)
    CIDEr-D(c, S) = 10 / m * sum_s 1/n_max * sum_{n=1..n_max} sim_n(c, s)

with n_max = 4, sigma = 6, N the number of images (reference sets) the document frequencies were counted
on, df(w) the number of those images whose references contain w, the ``min`` the clipping of the candidate's
weights, and l the length used by the toolkit (the number of bigrams, i.e. words - 1; only the difference
matters). A norm of 0 leaves the dot product unnormalised, as in the toolkit (it is 0 then anyway).

:class:`CiderD` is fitted on a reference corpus (``fit``); unfitted, ``score_batch`` fits it on the
reference sets of the batch, as the toolkit does on an evaluation set. Repeated reference sets (the G
rollouts of one prompt) are counted once. With a single distinct reference set log(N) = 0 and every score
is 0, so the ``cider_d`` reward refuses to batch-fit fewer than 2 reference sets: fit it on the training
references instead (``get_reward("cider_d", corpus=[...])``), as self-critical captioning training does.

**BLEU-4** (Papineni et al. 2002): clipped n-gram precisions p_1..p_4 (a candidate n-gram counts at most as
often as in the reference where it is most frequent), geometric mean with uniform weights, brevity penalty
BP = exp(1 - r/c) when c <= r (c candidate length, r the reference length closest to c, the shorter on a
tie). ``corpus_bleu`` sums matches, totals and lengths over the corpus before dividing (unsmoothed).
``sentence_bleu`` smooths, by default with **add-one smoothing for n >= 2** (Lin & Och 2004, "BLEU+1";
method 2 of Chen & Cherry 2014 restricted to n >= 2): p_n = (matches_n + 1) / (totals_n + 1) for n >= 2,
p_1 unsmoothed, so a candidate with no unigram match scores 0. ``smoothing="epsilon"`` replaces a zero
match count by 0.1 (Chen & Cherry method 1); ``"none"`` is unsmoothed.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .registry import RewardError, register_reward
from .text import ngrams, prepare_pairs, tokenize

RefSet = Union[str, Sequence[str]]


def _as_list(refs: RefSet) -> List[str]:
    return [refs] if isinstance(refs, str) else list(refs)


# ---------------------------------------------------------------------------------------------- CIDEr-D
def _all_ngrams(tokens: Sequence[str], n: int) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        counts.update(ngrams(tokens, k))
    return counts


class CiderD:
    """CIDEr-D scorer (see the module docstring). ``n`` = 4 and ``sigma`` = 6 are the standard parameters.

    >>> cider = CiderD().fit([["a cat on a mat", "a cat sits"], ["a dog runs", "a brown dog"]])
    >>> cider.score("a cat on a mat", ["a cat on a mat", "a cat sits"]) > cider.score("a dog", ["a cat sits"])
    True
    """

    def __init__(self, n: int = 4, sigma: float = 6.0, corpus: Optional[Iterable[RefSet]] = None):
        if n < 1:
            raise ValueError(f"CiderD.n = {n!r} is out of range: expected n >= 1")
        if not sigma > 0:
            raise ValueError(f"CiderD.sigma = {sigma!r} is out of range: expected sigma > 0")
        self.n = n
        self.sigma = float(sigma)
        self.document_frequency: Dict[Tuple[str, ...], float] = {}
        self.num_documents = 0
        if corpus is not None:
            self.fit(corpus)

    @property
    def fitted(self) -> bool:
        return self.num_documents > 0

    def fit(self, corpus: Iterable[RefSet], dedupe: bool = True) -> CiderD:
        """Count document frequencies over ``corpus``: one entry per image, its reference caption(s).

        With ``dedupe`` (default) identical reference sets are counted once.
        """
        df: Dict[Tuple[str, ...], float] = defaultdict(float)
        seen = set()
        num = 0
        for refs in corpus:
            refs = tuple(_as_list(refs))
            if dedupe:
                if refs in seen:
                    continue
                seen.add(refs)
            num += 1
            present = set()
            for r in refs:
                present.update(_all_ngrams(tokenize(r), self.n))
            for g in present:
                df[g] += 1.0
        self.document_frequency = dict(df)
        self.num_documents = num
        return self

    def _vec(self, counts: Counter, log_n: float) -> Tuple[List[Dict], List[float], int]:
        vec: List[Dict[Tuple[str, ...], float]] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            w = tf * (log_n - math.log(max(1.0, self.document_frequency.get(g, 0.0))))
            vec[k][g] = w
            norm[k] += w * w
            if k == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def _sim(self, c, s) -> float:
        (vc, nc, lc), (vs, ns, ls) = c, s
        delta = float(lc - ls)
        penalty = math.exp(-(delta ** 2) / (2.0 * self.sigma ** 2))
        total = 0.0
        for k in range(self.n):
            val = 0.0
            for g, w in vc[k].items():
                ws = vs[k].get(g)
                if ws is not None:
                    val += min(w, ws) * ws
            if nc[k] != 0 and ns[k] != 0:
                val /= nc[k] * ns[k]
            total += val * penalty
        return total / self.n

    def score(self, candidate: str, references: RefSet) -> float:
        """CIDEr-D of one candidate against its reference(s); needs a fitted scorer."""
        if not self.fitted:
            raise ValueError("CiderD.score needs document frequencies: call fit(corpus) first or use score_batch")
        refs = _as_list(references)
        if not refs:
            raise ValueError("CiderD.score: empty reference list")
        log_n = math.log(float(self.num_documents))
        c = self._vec(_all_ngrams(tokenize(candidate), self.n), log_n)
        total = sum(self._sim(c, self._vec(_all_ngrams(tokenize(r), self.n), log_n)) for r in refs)
        return 10.0 * total / len(refs)

    def score_batch(self, candidates: Sequence[str], references: Sequence[RefSet]) -> List[float]:
        """Scores of many candidates. An unfitted scorer uses document frequencies of ``references``
        (distinct reference sets) for this call only, leaving itself unfitted."""
        if len(candidates) != len(references):
            raise ValueError(f"CiderD.score_batch: {len(candidates)} candidates but {len(references)} references")
        scorer = self
        if not self.fitted:
            scorer = CiderD(self.n, self.sigma).fit(references)
        return [scorer.score(c, r) for c, r in zip(candidates, references)]

    def state_dict(self) -> Dict[str, Any]:
        """JSON-friendly document frequencies (n-grams joined by spaces) and parameters."""
        return {"n": self.n, "sigma": self.sigma, "num_documents": self.num_documents,
                "document_frequency": {" ".join(g): v for g, v in self.document_frequency.items()}}

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> CiderD:
        obj = cls(n=int(state["n"]), sigma=float(state["sigma"]))
        obj.num_documents = int(state["num_documents"])
        obj.document_frequency = {tuple(k.split(" ")): float(v) for k, v in state["document_frequency"].items()}
        return obj


def cider_d(candidates: Sequence[str], references: Sequence[RefSet], n: int = 4, sigma: float = 6.0
            ) -> Tuple[float, List[float]]:
    """COCO-style CIDEr-D of a corpus, document frequencies from its own references: (mean, per-candidate)."""
    scores = CiderD(n, sigma).score_batch(candidates, references)
    return (sum(scores) / len(scores) if scores else 0.0), scores


@register_reward("cider_d")
class CiderDReward:
    """Reward: CIDEr-D of each response (its ``<answer>`` span when ``use_answer_tag``) against its reference(s).

    ``corpus`` (reference sets, one per image) fits the document frequencies once; without it every call
    fits them on the batch's distinct reference sets and needs at least 2 of them.
    """

    def __init__(self, corpus: Optional[Iterable[RefSet]] = None, n: int = 4, sigma: float = 6.0,
                 use_answer_tag: bool = True, scorer: Optional[CiderD] = None):
        self.scorer = scorer if scorer is not None else CiderD(n, sigma, corpus)
        self.use_answer_tag = use_answer_tag

    def fit_references(self, reference_sets: Iterable[RefSet]) -> None:
        """Fit the document frequencies once on the training set's references (the trainer calls this), so
        the reward does not depend on the batch or the parallel layout; a corpus given explicitly wins."""
        if not self.scorer.fitted:
            sets = [list(r) for r in reference_sets if r]
            if len({tuple(r) for r in sets}) >= 2:
                self.scorer.fit(sets)

    def __call__(self, responses: Sequence[str], references: Sequence[Any], **_: Any) -> List[float]:
        pairs = prepare_pairs(responses, references, "cider_d", self.use_answer_tag)
        cands = [c for c, _ in pairs]
        refs = [r for _, r in pairs]
        if not self.scorer.fitted and len({tuple(r) for r in refs}) < 2:
            raise RewardError(
                "cider_d: the batch holds fewer than 2 distinct reference sets, so every CIDEr-D score would be 0 "
                "(log N = 0); fit the document frequencies on a reference corpus: get_reward('cider_d', corpus=...)"
            )
        return self.scorer.score_batch(cands, refs)


# ---------------------------------------------------------------------------------------------- BLEU
def bleu_stats(candidate: Sequence[str], references: Sequence[Sequence[str]], n: int = 4
               ) -> Tuple[List[int], List[int], int, int]:
    """(clipped matches per order, candidate n-gram totals per order, candidate length, closest ref length)
    for token lists."""
    matches, totals = [], []
    for k in range(1, n + 1):
        cand = ngrams(candidate, k)
        max_ref: Counter = Counter()
        for ref in references:
            for g, c in ngrams(ref, k).items():
                if c > max_ref[g]:
                    max_ref[g] = c
        matches.append(sum(min(c, max_ref[g]) for g, c in cand.items()))
        totals.append(max(len(candidate) - k + 1, 0))
    c_len = len(candidate)
    r_len = min((abs(len(r) - c_len), len(r)) for r in references)[1] if references else 0
    return matches, totals, c_len, r_len


def _bleu_from_stats(matches, totals, c_len, r_len, smoothing: str) -> float:
    if c_len == 0:
        return 0.0
    log_p = 0.0
    n = len(matches)
    for k, (m, t) in enumerate(zip(matches, totals)):
        if smoothing == "add1" and k >= 1:
            m, t = m + 1, t + 1
        elif smoothing == "epsilon" and m == 0 and t > 0:
            m = 0.1
        if m <= 0 or t <= 0:
            return 0.0
        log_p += math.log(m / t) / n
    bp = 1.0 if c_len > r_len else math.exp(1.0 - r_len / c_len)
    return bp * math.exp(log_p)


_SMOOTHINGS = ("add1", "epsilon", "none")


def sentence_bleu(candidate: str, references: RefSet, n: int = 4, smoothing: str = "add1") -> float:
    """BLEU-n of one candidate against its reference(s), smoothed (``add1`` default; see module docstring)."""
    if smoothing not in _SMOOTHINGS:
        raise ValueError(f"sentence_bleu smoothing = {smoothing!r}: expected one of {_SMOOTHINGS}")
    refs = [tokenize(r) for r in _as_list(references)]
    return _bleu_from_stats(*bleu_stats(tokenize(candidate), refs, n), smoothing=smoothing)


def corpus_bleu(candidates: Sequence[str], references: Sequence[RefSet], n: int = 4) -> float:
    """Corpus BLEU-n (unsmoothed): statistics summed over all candidates, then combined once."""
    if len(candidates) != len(references):
        raise ValueError(f"corpus_bleu: {len(candidates)} candidates but {len(references)} references")
    m_sum, t_sum, c_sum, r_sum = [0] * n, [0] * n, 0, 0
    for cand, refs in zip(candidates, references):
        m, t, c, r = bleu_stats(tokenize(cand), [tokenize(x) for x in _as_list(refs)], n)
        m_sum = [a + b for a, b in zip(m_sum, m)]
        t_sum = [a + b for a, b in zip(t_sum, t)]
        c_sum += c
        r_sum += r
    return _bleu_from_stats(m_sum, t_sum, c_sum, r_sum, smoothing="none")


@register_reward("bleu4")
def bleu4_reward(responses: Sequence[str], references: Sequence[Any], *, smoothing: str = "add1",
                 use_answer_tag: bool = True, **_: Any) -> List[float]:
    """Reward: sentence BLEU-4 (in [0, 1]) of each response against its reference(s)."""
    return [sentence_bleu(c, refs, 4, smoothing) for c, refs in prepare_pairs(responses, references, "bleu4",
                                                                             use_answer_tag)]
