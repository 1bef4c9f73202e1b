"""data.long_prompts=truncate: the prompt text's longest tail that fits data.max_prompt_tokens in the family's
format; images whole; None when nothing fits."""

from __future__ import annotations

import pytest

from megatron_rcpa.data.sample import Sample
from megatron_rcpa.data.sampler import prompt_truncator
from megatron_rcpa.models import families


def _llama_format():
    fam = families.get("llama")
    tok = fam.tiny_tokenizer()
    return fam.make_prompt_format(tok, fam.tiny_config(tok)).format


@pytest.mark.parametrize("limit", [20, 37, 64])
def test_truncation_keeps_the_longest_fitting_tail(limit):
    fmt = _llama_format()
    text = "".join(f"word{i} " for i in range(60)) + "What is 2 + 3?"
    sample = Sample(id="a", prompt=text, reference="5")
    cut = prompt_truncator(fmt, limit)(sample)
    assert cut is not None and text.endswith(cut.prompt) and len(fmt(cut).prompt_ids) <= limit
    longer = Sample(id="a", prompt=text[len(text) - len(cut.prompt) - 1:], reference="5")
    assert len(fmt(longer).prompt_ids) > limit  # one more character would not fit: the longest tail
    assert cut.meta["truncated_prompt_chars"] == len(text) - len(cut.prompt)


def test_short_prompts_are_untouched_and_impossible_ones_refused():
    fmt = _llama_format()
    sample = Sample(id="a", prompt="hi", reference="x")
    assert prompt_truncator(fmt, 100)(sample) is sample
    assert prompt_truncator(fmt, 3)(sample) is None  # the chat structure alone is longer


def test_long_prompts_is_a_config_choice():
    from megatron_rcpa.train.config import load_config

    assert load_config(None, ["data.long_prompts=truncate"]).data.long_prompts == "truncate"
    with pytest.raises(ValueError, match="long_prompts"):
        load_config(None, ["data.long_prompts=cut"])
