"""ROUGE-L and token F1: hand-computed values; the bit-parallel LCS against the textbook DP."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rcpa.rewards import get_reward, lcs_length, normalize_answer, rouge_l, token_f1


def _lcs_dp(a, b):
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from("abcd"), max_size=40), st.lists(st.sampled_from("abcd"), max_size=40))
def test_lcs_bit_parallel_matches_dp(a, b):
    assert lcs_length(a, b) == _lcs_dp(a, b)


def test_lcs_long_inputs():
    a = [f"w{i % 97}" for i in range(3000)]
    b = [f"w{i % 89}" for i in range(2500)]
    assert lcs_length(a, b) == lcs_length(b, a) > 0


def test_rouge_l_by_hand():
    # Lin (2004): LCS("police killed the gunman", "police kill the gunman") = police the gunman = 3; P = R = 3/4
    assert rouge_l("police kill the gunman", "police killed the gunman") == pytest.approx(0.75)
    # LCS("the gunman kill police", ...) = "the gunman" = 2 -> P = R = 1/2
    assert rouge_l("the gunman kill police", "police killed the gunman") == pytest.approx(0.5)
    # "the cat sat" vs "the cat on the mat": LCS 2, P = 2/3, R = 2/5
    #   beta 1:   2 P R / (P + R) = (8/15) / (16/15) = 1/2
    #   beta 1.2: 2.44 P R / (R + 1.44 P) = 2.44 * (4/15) / (2/5 + 0.96)
    assert rouge_l("the cat sat", "the cat on the mat") == pytest.approx(0.5)
    assert rouge_l("the cat sat", "the cat on the mat", beta=1.2) == pytest.approx(2.44 * 4 / 15 / 1.36)
    assert rouge_l("The cat, sat!", "the cat sat") == pytest.approx(1.0)  # case and punctuation ignored
    assert rouge_l("dog", "the cat") == 0.0
    assert rouge_l("", "the cat") == 0.0
    # several references: the best F
    assert rouge_l("the cat sat", ["a dog", "the cat on the mat", "the cat sat"]) == pytest.approx(1.0)


def test_normalize_answer():
    assert normalize_answer("The  Eiffel-Tower, in PARIS!") == "eiffeltower in paris"
    assert normalize_answer("an apple a day") == "apple day"


def test_token_f1_by_hand():
    # pred -> "eiffel tower in paris" (4 tokens), gold -> "eiffel tower is in paris france" (6): common 4
    # P = 1, R = 4/6, F1 = 2 * (2/3) / (5/3) = 0.8
    assert token_f1("The Eiffel tower, in Paris.", "the eiffel tower is in paris france") == pytest.approx(0.8)
    # multiset overlap: pred x x y, gold x y y -> common = min(2,1) + min(1,2) = 2; P = R = 2/3
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1("", "the") == 1.0  # both empty after normalisation
    assert token_f1("", "cat") == 0.0
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("cat", ["dog", "a cat"]) == 1.0  # best reference


def test_report_rewards():
    resp = ["<think>x</think><answer>police kill the gunman</answer>", "police kill the gunman"]
    refs = ["police killed the gunman", "police killed the gunman"]
    assert get_reward("rouge_l")(resp, refs) == pytest.approx([0.75, 0.75])
    assert get_reward("rouge_l", use_answer_tag=False)(resp[:1], refs[:1])[0] < 0.75
    # token F1 drops "the": "police kill gunman" vs "police killed gunman": 2 of 3 tokens both ways
    assert get_reward("token_f1")(resp, refs) == pytest.approx([2 / 3, 2 / 3])
