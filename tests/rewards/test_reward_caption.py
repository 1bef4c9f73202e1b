"""BLEU-4 and CIDEr-D: hand-computed values and invariants."""

import json
import math

import pytest

from megatron_rcpa.rewards import CiderD, RewardError, bleu_stats, cider_d, corpus_bleu, get_reward, sentence_bleu
from megatron_rcpa.rewards.text import tokenize

# ---------------------------------------------------------------------------------------------- BLEU


def test_bleu_stats_by_hand():
    # cand: the cat sat on the mat     ref: the cat sat on a mat
    # 1-grams: the(2, clipped to 1) cat sat on mat -> 5/6
    # 2-grams: [the cat, cat sat, sat on] match, [on the, the mat] do not -> 3/5
    # 3-grams: [the cat sat, cat sat on] -> 2/4;  4-grams: [the cat sat on] -> 1/3
    m, t, c, r = bleu_stats(tokenize("the cat sat on the mat"), [tokenize("the cat sat on a mat")])
    assert (m, t, c, r) == ([5, 3, 2, 1], [6, 5, 4, 3], 6, 6)


def test_sentence_bleu_by_hand():
    cand, ref = "The cat sat on the mat.", "the cat sat on a mat"
    # add-one for n >= 2: (5/6 * 4/6 * 3/5 * 2/4) ** (1/4) = (1/6) ** (1/4), BP = 1 (c = r = 6)
    assert sentence_bleu(cand, ref) == pytest.approx((1 / 6) ** 0.25, rel=1e-12)
    # unsmoothed: (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/12) ** (1/4)
    assert sentence_bleu(cand, ref, smoothing="none") == pytest.approx((1 / 12) ** 0.25, rel=1e-12)
    assert sentence_bleu(cand, cand) == pytest.approx(1.0)


def test_sentence_bleu_brevity_penalty_and_smoothing_edges():
    # "the cat" vs a 6-word ref: p1 = 2/2, add-one p2 = (1+1)/(1+1), p3 = p4 = (0+1)/(0+1); BP = exp(1 - 6/2)
    assert sentence_bleu("the cat", "the cat sat on the mat") == pytest.approx(math.exp(-2.0), rel=1e-12)
    assert sentence_bleu("the cat", "the cat sat on the mat", smoothing="none") == 0.0  # no 3-grams at all
    # epsilon: "the cat sat on" vs "the cat sat in": 3/4, 2/3, 1/2, and 0.1/1 in place of 0/1 for the 4-gram
    got = sentence_bleu("the cat sat on", "the cat sat in", smoothing="epsilon")
    assert got == pytest.approx((3 / 4 * 2 / 3 * 1 / 2 * 0.1 / 1) ** 0.25, rel=1e-12)
    assert sentence_bleu("dog", "the cat") == 0.0  # no unigram match: 0 whatever the smoothing
    assert sentence_bleu("", "the cat") == 0.0
    with pytest.raises(ValueError, match="smoothing"):
        sentence_bleu("a", "a", smoothing="nope")


def test_bleu_closest_reference_length_prefers_shorter_on_tie():
    # cand length 3; refs of length 2 and 4 are equally close -> r = 2 -> c > r -> BP = 1
    m, t, c, r = bleu_stats(["a", "b", "c"], [["a", "b"], ["a", "b", "c", "d"]])
    assert (c, r) == (3, 2)
    assert sentence_bleu("a b c", ["a b", "a b c d"]) == pytest.approx(1.0)  # all n-grams found in the 4-word ref


def test_corpus_bleu_by_hand():
    cands = ["the cat sat on the mat", "a dog"]
    refs = [["the cat sat on a mat"], "a dog runs fast"]
    # pair 1: m = [5, 3, 2, 1], t = [6, 5, 4, 3], c = r = 6;  pair 2: m = [2, 1, 0, 0], t = [2, 1, 0, 0], c 2, r 4
    # sums: m = [7, 4, 2, 1], t = [8, 6, 4, 3], c = 8, r = 10 -> BP = exp(1 - 10/8)
    expected = math.exp(-0.25) * (7 / 8 * 4 / 6 * 2 / 4 * 1 / 3) ** 0.25
    assert corpus_bleu(cands, refs) == pytest.approx(expected, rel=1e-12)


def test_bleu4_reward_uses_answer_span():
    r = get_reward("bleu4")
    out = r(["<think>blah</think><answer>the cat sat on the mat</answer>", "the cat sat on the mat"],
            ["the cat sat on the mat", ["x y", "the cat sat on the mat"]])
    assert out == pytest.approx([1.0, 1.0])


# ---------------------------------------------------------------------------------------------- CIDEr-D
TOY = [["a cat sat", "a cat ran"], ["a dog sat"]]  # two images


def test_cider_d_known_values_on_toy_corpus():
    # N = 2 images, L = log 2. df: a = 2, sat = 2 (weight 0); every other n-gram df = 1 (weight L).
    cider = CiderD().fit(TOY)
    assert cider.num_documents == 2
    # "a cat sat" vs ref 1 "a cat sat": identical vectors -> sim_1 = sim_2 = sim_3 = 1, sim_4 = 0 (no 4-grams)
    #   -> 3/4.  vs ref 2 "a cat ran": n=1: cand {cat: L} (a, sat weigh 0), ref {cat: L, ran: L}:
    #   L^2 / (L * sqrt(2) L) = 1/sqrt2; n=2: {a cat, cat sat} vs {a cat, cat ran}: L^2 / (2 L^2) = 1/2;
    #   n=3: 0 -> (1/sqrt2 + 1/2) / 4.  Equal lengths: no penalty. CIDEr-D = 10 * mean over the 2 refs.
    expected = 10 * (3 / 4 + (1 / math.sqrt(2) + 1 / 2) / 4) / 2
    assert cider.score("a cat sat", TOY[0]) == pytest.approx(expected, rel=1e-12)
    # "a cat" (1 bigram vs 2: delta = -1, penalty exp(-1 / (2 * 6^2))):
    #   vs ref 1: n=1 {cat: L} -> 1; n=2 {a cat} vs {a cat, cat sat}: L^2 / (L * sqrt2 L) = 1/sqrt2
    #   vs ref 2: n=1: L^2 / (L * sqrt2 L) = 1/sqrt2; n=2: 1/sqrt2
    pen = math.exp(-1 / 72)
    expected = 10 * pen * ((1 + 1 / math.sqrt(2)) / 4 + (2 / math.sqrt(2)) / 4) / 2
    assert cider.score("a cat", TOY[0]) == pytest.approx(expected, rel=1e-12)
    # a two-word caption identical to its only reference, in a 2-image corpus of unrelated captions:
    # sim_1 = sim_2 = 1, no 3/4-grams -> 10 * 2 / 4 = 5
    assert CiderD().fit([["a b"], ["c d"]]).score("a b", ["a b"]) == pytest.approx(5.0)


def test_cider_d_invariants():
    corpus = [["a man rides a horse on the beach", "a person riding a horse near the sea"],
              ["two dogs play with a ball in the park", "dogs playing in a park"],
              ["a plate of food with rice and vegetables", "a dish of rice and vegetables"]]
    cider = CiderD().fit(corpus)
    refs = corpus[0]
    cands = ["a man rides a horse on the beach",  # identical to a reference
             "a man rides a horse on the sand",
             "a man rides a horse",
             "a horse",
             "two dogs play in the park"]  # another image's caption
    scores = [cider.score(c, refs) for c in cands]
    assert scores == sorted(scores, reverse=True)  # rank order
    assert scores[0] > scores[1] > scores[2] > scores[3] > scores[4] >= 0.0
    assert cider.score("completely unrelated words here", refs) == 0.0
    # clipping: repeating a matching word does not raise the score
    assert cider.score("horse horse horse horse", refs) <= cider.score("horse", refs) + 1e-12


def test_cider_d_batch_fit_dedupes_repeated_reference_sets():
    cands = ["a cat sat", "a cat", "a dog sat", "a dog"]
    refs_unique = [TOY[0], TOY[0], TOY[1], TOY[1]]
    mean, scores = cider_d(cands, refs_unique)
    fitted = CiderD().fit(TOY)
    assert scores == pytest.approx([fitted.score(c, r) for c, r in zip(cands, refs_unique)])
    assert mean == pytest.approx(sum(scores) / 4)
    unfitted = CiderD()
    unfitted.score_batch(cands, refs_unique)
    assert not unfitted.fitted  # batch fitting does not stick
    with pytest.raises(ValueError, match="fit"):
        unfitted.score("a", ["a"])


def test_cider_d_state_dict_round_trip():
    cider = CiderD(sigma=4.0).fit(TOY)
    back = CiderD.from_state_dict(json.loads(json.dumps(cider.state_dict())))
    assert back.sigma == 4.0 and back.num_documents == 2
    assert back.score("a cat", TOY[0]) == cider.score("a cat", TOY[0])


def test_cider_d_reward():
    r = get_reward("cider_d")
    out = r(["a cat sat", "a dog sat"], [TOY[0], TOY[1]])
    assert out[0] == pytest.approx(CiderD().fit(TOY).score("a cat sat", TOY[0]))
    with pytest.raises(RewardError, match="fewer than 2 distinct reference sets"):
        r(["a cat sat", "a cat"], [TOY[0], TOY[0]])  # one prompt's group: log N would be 0
    fitted = get_reward("cider_d", corpus=TOY)
    assert fitted(["a cat sat", "a cat"], [TOY[0], TOY[0]])[0] == pytest.approx(out[0])
    with pytest.raises(RewardError, match="sample 1 has none"):
        fitted(["a", "b"], ["a", None])


def test_cider_d_rejects_bad_parameters():
    with pytest.raises(ValueError, match="sigma"):
        CiderD(sigma=0)
    with pytest.raises(ValueError, match=r"CiderD.n"):
        CiderD(n=0)
