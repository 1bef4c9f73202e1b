"""Reward functions written for verl and TRL, by import or file path, through our batched contract; the sample
fields the trainer passes; CIDEr-D fitted once on the training references (layout-independent); math-verify."""

from __future__ import annotations

import threading

import pytest

from megatron_rcpa.data.sample import Sample
from megatron_rcpa.rewards import CiderDReward, detect_api, get_reward
from megatron_rcpa.rewards.fields import sample_fields

VERL_FILE = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    if data_source == "geo3k":
        return {"score": float(ground_truth in solution_str) * extra_info["weight"], "acc": 1.0}
    return 0.25
'''


def _samples():
    return [Sample(id="a", prompt="What is 2+2?", reference="4", meta={"all_references": ["4", "four"], "level": 1}),
            Sample(id="b", prompt="Angle?", reference="30", meta={"level": 2})]


def test_verl_compute_score_by_file_path_sees_data_source_and_extra_info(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(VERL_FILE)
    fn = get_reward(f"{path}:compute_score")
    assert type(fn.fn).__name__ == "VerlReward"
    fields = sample_fields(_samples())
    fields["data_sources"] = ["geo3k", "other"]
    fields["extra_infos"] = [{"weight": 0.5}, {}]
    assert fn(["the answer is 4", "x"], ["4", "30"], **fields) == [0.5, 0.25]
    with pytest.raises(ValueError, match="does not exist"):
        get_reward(f"{tmp_path / 'nope.py'}:compute_score")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        get_reward(f"{path}:missing")


def test_verl_dict_without_score_is_an_error():
    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        return {"acc": 1.0}

    with pytest.raises(ValueError, match="without a 'score' key for sample 0"):
        get_reward(compute_score)(["x"], ["y"])


def test_trl_reward_gets_prompts_completions_and_columns():
    seen = {}

    def accuracy(prompts, completions, ground_truth, **kwargs):
        seen.update(prompts=prompts, kwargs=sorted(kwargs), level=kwargs.get("level"))
        return [float(gt in c) for c, gt in zip(completions, ground_truth)]

    def strict(prompts, completions, solution):  # no **kwargs: only the columns it names
        return [float(s == c) for c, s in zip(completions, solution)]

    fields = sample_fields(_samples())
    assert get_reward(accuracy)(["it is 4", "45"], ["4", "30"], **fields) == [1.0, 0.0]
    assert seen["prompts"] == ["What is 2+2?", "Angle?"] and seen["level"] == [1, 2]
    assert {"data_source", "extra_info", "solution", "reference", "level"} <= set(seen["kwargs"])
    assert get_reward(strict)(["4", "31"], ["4", "30"], **fields) == [1.0, 0.0]


def test_api_detection_and_forcing():
    def ours(responses, references, **_):
        return [0.0] * len(responses)

    def verl(data_source, solution_str, ground_truth, extra_info=None):
        return 1.0

    def trl(prompts, completions, **kw):
        return [1.0] * len(completions)

    assert [detect_api(f) for f in (ours, verl, trl)] == ["rcpa", "verl", "trl"]
    assert get_reward(ours, api="rcpa")(["a"], ["b"]) == [0.0]
    with pytest.raises(ValueError, match="reward api 'nemo'"):
        get_reward(ours, api="nemo")


def test_sample_fields_lists_every_reference_and_defaults():
    s = _samples()
    s[1].data_source = "geometry"  # readers set it on the sample
    f = sample_fields(s)
    assert f["all_references"] == [["4", "four"], ["30"]] and f["ids"] == ["a", "b"]
    assert f["data_sources"] == ["", "geometry"] and f["extra_infos"] == [{}, {}]


def test_cider_fitted_once_on_training_references_is_layout_independent():
    train_refs = [["a red cat on a mat"], ["two dogs play in the park"], ["a man rides a red bike"],
                  ["a bowl of green apples"]]
    responses = ["a red cat", "dogs play in a park", "a man on a bike", "green apples"]
    refs = [r[0] for r in train_refs]

    def fitted():
        fn = get_reward("cider_d", use_answer_tag=False)
        fn.fn.fit_references(train_refs)
        return fn

    whole = fitted()(responses, refs)
    fn = fitted()  # two "ranks" of two rollouts each score exactly what one rank of four scores
    halves = fn(responses[:2], refs[:2]) + fn(responses[2:], refs[2:])
    assert halves == pytest.approx(whole) and max(whole) > 0
    unfitted = CiderDReward(use_answer_tag=False)
    assert unfitted(responses[:2], refs[:2]) != pytest.approx(whole[:2])  # batch IDF: depends on the split


def test_math_verify_reward():
    pytest.importorskip("math_verify")
    fn = get_reward("math_verify")
    out = fn(["so the answer is \\boxed{0.5}", "\\boxed{\\frac{1}{2}}", "\\boxed{3}", "no answer"],
             ["\\frac{1}{2}", "0.5", "4", "1"])
    assert out == [1.0, 1.0, 0.0, 0.0]
    errors = []

    def in_thread():
        try:
            fn(["\\boxed{1}"], ["1"])
        except RuntimeError as exc:
            errors.append(str(exc))

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert errors and "main thread" in errors[0]


def test_reward_api_is_a_config_key():
    from megatron_rcpa.train.config import load_config

    assert load_config(None, ["reward.api=verl"]).reward.api == "verl"
    with pytest.raises(ValueError, match="api"):
        load_config(None, ["reward.api=nemo"])
