"""Registry (names, import paths), the NaN/inf check, the format reward and CompositeReward."""

import math
import textwrap

import pytest

from megatron_rcpa.rewards import (
    REWARD_REGISTRY,
    CompositeReward,
    RewardError,
    check_rewards,
    format_ok,
    get_reward,
    list_rewards,
    register_reward,
)


def test_builtin_names():
    assert {"math_answer", "cider_d", "bleu4", "rouge_l", "token_f1", "format", "composite"} <= set(list_rewards())


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown reward 'nope': expected one of \[.*math_answer"):
        get_reward("nope")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_user_rewards.py").write_text(textwrap.dedent("""
        def length_reward(responses, references, scale=1.0, **_):
            return [scale * len(r) for r in responses]

        class Holder:
            @staticmethod
            def const(responses, references, **_):
                return [0.5] * len(responses)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_user_rewards"


def test_import_path_selection(user_module):
    r = get_reward(f"{user_module}:length_reward")
    assert r(["ab", "abcd"], [None, None]) == [2.0, 4.0]
    assert get_reward(f"{user_module}.length_reward", scale=0.5)(["ab"], [None]) == [1.0]
    assert get_reward(f"{user_module}:Holder.const")(["x"], [None]) == [0.5]
    assert get_reward("megatron_rcpa.rewards.report:token_f1_reward")(["a cat"], ["cat"]) == [1.0]


def test_import_path_errors(user_module):
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        get_reward("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match=f"module '{user_module}' has no attribute 'missing'"):
        get_reward(f"{user_module}:missing")


def test_register_reward_and_duplicate_name():
    @register_reward("_test_const")
    def const(responses, references, **_):
        return [1.0] * len(responses)

    try:
        assert get_reward("_test_const")(["a", "b"], [None, None]) == [1.0, 1.0]
        with pytest.raises(ValueError, match="already registered"):
            register_reward("_test_const")(lambda r, f, **_: r)
    finally:
        REWARD_REGISTRY.pop("_test_const")


def test_nan_reward_names_the_sample():
    def bad(responses, references, **_):
        return [1.0, float("nan"), math.inf]

    r = get_reward(bad)
    with pytest.raises(RewardError) as exc:
        r(["fine", "The answer is " + "x" * 200, "third"], ["1", "2", "3"])
    msg = str(exc.value)
    assert "reward 'bad'" in msg and "sample 1" in msg and "nan" in msg and "(and 1 more samples)" in msg
    assert "'The answer is xxx" in msg and "..." in msg and "x" * 100 not in msg  # an 80-character prefix


def test_check_rewards():
    assert check_rewards([1, 0.5, True], ["a", "b", "c"]) == [1.0, 0.5, 1.0]
    with pytest.raises(RewardError, match="returned 1 values for 2 responses"):
        check_rewards([1.0], ["a", "b"])
    with pytest.raises(RewardError, match=r"non-finite value 'x' for sample 0; response 'r'"):
        check_rewards(["x"], ["r"])
    with pytest.raises(RewardError, match="sample 0"):
        check_rewards([-math.inf], ["r"])


def test_wrapper_checks_lengths():
    r = get_reward("format")
    with pytest.raises(RewardError, match="2 responses but 1 references"):
        r(["a", "b"], ["a"])
    with pytest.raises(RewardError, match="sample field 'prompts' has 1 entries for 2 responses"):
        r(["a", "b"], [None, None], prompts=["p"])
    assert r(["a"], [None], prompts=["p"], ids=["x"]) == [0.0]  # extra sample fields are accepted


@pytest.mark.parametrize("response, preset, ok", [
    ("<think>reason</think><answer>3</answer>", "think_answer", True),
    ("  <think>a\nb</think>\n<answer>3</answer>\n", "think_answer", True),
    ("<think>reason</think>", "think_answer", False),
    ("<answer>3</answer>", "think_answer", False),
    ("text <think>r</think><answer>3</answer>", "think_answer", False),
    ("<think>r</think><answer>3</answer> trailing", "think_answer", False),
    ("<think>r</think><answer>3</answer><answer>4</answer>", "think_answer", False),
    ("<think><think>r</think><answer>3</answer>", "think_answer", False),
    (r"so \boxed{3}", "boxed", True),
    (r"so \boxed{}", "boxed", False),
    ("so 3", "boxed", False),
    ("<think>r</think> so \\boxed{3}.", "think_boxed", True),
    ("so \\boxed{3}", "think_boxed", False),
])
def test_format_presets(response, preset, ok):
    assert format_ok(response, preset=preset) is ok


def test_format_custom_pattern_and_errors():
    r = get_reward("format", pattern=r"\AANSWER: \d+\Z")
    assert r(["ANSWER: 12", "answer: 12", "ANSWER: 12 x"], [None] * 3) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="unknown preset"):
        format_ok("x", preset="nope")
    with pytest.raises(ValueError, match="invalid pattern"):
        format_ok("x", pattern="(")


def test_composite_reward():
    comp = CompositeReward({"math_answer": 0.9, "format": 0.1})
    responses = ["<think>t</think><answer>\\boxed{3}</answer>", "\\boxed{3}", "<think>t</think><answer>4</answer>"]
    assert comp(responses, ["3", "3", "3"]) == pytest.approx([1.0, 0.9, 0.1])
    assert comp.last_components == {"math_answer": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 1.0]}
    # the same reward twice with different arguments, and a callable; selected by name through the registry
    comp2 = get_reward("composite", rewards=[("format", 1.0), ("format", 2.0, {"preset": "boxed"}),
                                             (lambda r, f, **_: [0.25] * len(r), 4.0)])
    assert comp2(responses, [None] * 3) == pytest.approx([1 + 2 + 1, 0 + 2 + 1, 1 + 0 + 1])
    assert list(comp2.fn.weights) == ["format", "format#1", "<lambda>"]


def test_composite_nan_names_the_part():
    comp = CompositeReward([(lambda r, f, **_: [float("nan")] * len(r), 1.0)])
    with pytest.raises(RewardError, match=r"reward '<lambda>' returned a non-finite value nan for sample 0"):
        comp(["x"], [None])
    with pytest.raises(ValueError, match="at least one"):
        CompositeReward({})
    with pytest.raises(ValueError, match="finite"):
        CompositeReward({"format": float("nan")})
