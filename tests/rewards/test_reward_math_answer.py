"""math_answer: answer extraction, number parsing and grading tables."""

import math

import pytest

from megatron_rcpa.rewards import (
    extract_answer,
    extract_choice,
    find_boxed,
    get_reward,
    grade_answer,
    parse_answer_number,
    parse_choice,
    parse_number,
)


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{42}.", ["42"]),
    (r"\boxed{\frac{1}{2}} and \boxed{3}", [r"\frac{1}{2}", "3"]),
    (r"\boxed{a_{1} + \{x\}}", [r"a_{1} + \{x\}"]),  # nested braces kept
    (r"\fbox{7}", ["7"]),
    (r"$\boxed 5$", ["5"]),
    (r"\boxed{unclosed", []),
    ("no box", []),
])
def test_find_boxed(text, expected):
    assert find_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    (r"First 3, then \boxed{12}. Finally 7.", "12"),  # boxed wins over later numbers
    (r"We get \boxed{1} then correct to \boxed{2}", "2"),  # the last box
    ("The answer is 3.5.", "3.5"),
    ("the final answer is: 1,234", "1,234"),
    ("**Answer:** 17", "17"),
    ("Answer = -4\nbecause ...", "-4"),
    ("we get 3 and then 7", "7"),  # last number
    ("so x = 12 cm^2", "12"),  # an exponent is not the last number
    ("the ratio is 3/4.", "3/4"),
    ("about 40% of them", "40%"),
    ("-3 and x-4", "4"),  # a hyphen inside a word is not a minus sign
    (r"\frac12", r"\frac12"),  # the whole text is a number
    ("1e-3", "1e-3"),
    ("(B)", "B"),
    ("C.", "C"),
    ("nothing here", None),
    ("", None),
    (None, None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("3", 3.0), ("-2.5", -2.5), (".5", 0.5), ("1,234", 1234.0), ("1,234,567.5", 1234567.5),
    ("3/4", 0.75), ("-3/4", -0.75), (r"\frac{3}{4}", 0.75), (r"\dfrac{3}{4}", 0.75), (r"\frac12", 0.5),
    (r"\frac{\sqrt{3}}{2}", math.sqrt(3) / 2), (r"2\sqrt{3}", 2 * math.sqrt(3)), (r"\sqrt[3]{8}", 2.0),
    (r"2\pi", 2 * math.pi), ("25%", 0.25), (r"25\%", 0.25), (r"45^\circ", 45.0), (r"45^{\circ}", 45.0),
    ("45°", 45.0), ("$7$", 7.0), (r"3 \times 10^{2}", 300.0), ("2^3", 8.0), ("1e-3", 0.001), ("7.", 7.0),
    ("\u22123", -3.0), (r"\left(\frac{1}{4}\right)", 0.25),
    # not numbers
    ("x", None), ("1,2", None), ("12 cm", None), ("x = 5", None), ("abc", None), (r"\sqrt{-1}", None),
    ("(-8)^(1/3)", None), ("9^9^9^9", None), ("1/0", None), ("", None), (None, None), ("__import__('os')", None),
])
def test_parse_number(text, expected):
    got = parse_number(text)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("text, expected", [
    ("x = 5", 5.0), ("12 cm^2", 12.0), ("5 square units", 5.0), ("about 12.5 cm", 12.5),
    (r"2\pi \text{ m}", 2 * math.pi), ("12 cm²", 12.0), ("x^2+1", None),
])
def test_parse_answer_number(text, expected):
    got = parse_answer_number(text)
    assert got == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B)", "B"), ("B: 45 degrees", "B"), ("(C) 30", "C"),
    (r"\text{D}", "D"), ("A man riding a horse", None), ("F", None), ("3", None), ("", None),
])
def test_parse_choice(text, expected):
    assert parse_choice(text) == expected


@pytest.mark.parametrize("text, expected", [
    (r"... so \boxed{C}", "C"),
    (r"\boxed{(B)}", "B"),
    (r"\boxed{\text{A}}", "A"),
    (r"\boxed{D. 45}", "D"),
    ("The answer is (B).", "B"),
    ("Answer: C", "C"),
    ("I pick option E", "E"),
    ("B", "B"),
    ("A. Because the angles sum to 180.", "A"),
    ("Between (A) and (C), it is (C)", "C"),
    ("A triangle has three sides.", None),  # an article is not a choice
    ("The answer is 45", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


@pytest.mark.parametrize("response, reference, ok", [
    (r"so \boxed{3}", "3", True),
    (r"so \boxed{3.0}", "3", True),
    (r"so \boxed{3}", "4", False),
    ("The answer is 0.75", "3/4", True),
    (r"\boxed{\frac{3}{4}}", "0.75", True),
    ("The answer is 0.7501", "0.75", False),  # rel error 1.3e-4 > 1e-4
    ("The answer is 0.750001", "0.75", True),  # rel error 1.3e-6
    ("The answer is 1,234", "1234", True),
    ("The answer is 25", "25%", True),  # a percentage matches its value as written ...
    ("The answer is 0.25", "25%", True),  # ... and over 100
    ("The answer is 25%", "0.25", True),
    ("The answer is 12 cm^2", "12", True),
    (r"\boxed{x = 5}", "5", True),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", True),
    (r"\boxed{45^\circ}", "45", True),
    ("There are 3 circles. The answer is \\boxed{3}.", "There are 3 circles. The answer is \\boxed{3}.", True),
    ("There are 4 circles. The answer is \\boxed{4}.", "There are 3 circles. The answer is \\boxed{3}.", False),
    ("no answer at all", "3", False),
    # choices
    (r"\boxed{B}", "B", True),
    ("The answer is (B).", "(B) 45", True),
    ("The answer is (C).", "B", False),
    ("I think B.", "B", False),  # a letter in running text is not a pick
    ("B. 45 degrees", "B.", True),
    # text answers
    (r"\boxed{\text{Paris}}", "paris", True),
    ("The answer is isosceles.", r"\boxed{Isosceles}", True),
    ("The answer is scalene.", r"\boxed{Isosceles}", False),
])
def test_grade_answer(response, reference, ok):
    assert grade_answer(response, reference) is ok


def test_tolerance_is_configurable():
    assert not grade_answer("The answer is 3.01", "3")
    assert grade_answer("The answer is 3.01", "3", rel_tol=0.01)
    assert grade_answer("The answer is 1e-7", "0", abs_tol=1e-6)
    assert not grade_answer("The answer is 1e-5", "0", abs_tol=1e-6)
    r = get_reward("math_answer", rel_tol=0.01)
    assert r(["The answer is 3.01"], ["3"]) == [1.0]


def test_reward_values_and_missing_reference():
    r = get_reward("math_answer")
    assert r([r"\boxed{3}", r"\boxed{4}", ""], ["3", "3", "3"]) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"math_answer needs a reference, sample 1 has none"):
        r(["3", "3"], ["3", None])
