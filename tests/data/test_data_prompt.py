"""build_prompt with a tiny tokenizer built here (no hub), a processor-like object, and the fallback."""

import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from megatron_rcpa.data import Sample, build_messages, build_prompt, image_placeholder_for

# A chat template that renders multimodal content lists (as VLM templates do) and plain strings.
VLM_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}[IMG]{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# A text-only template: content is a string.
TEXT_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:{% endif %}"
)


def _tokenizer(template=None):
    vocab = {"[UNK]": 0, "how": 1, "many": 2, "<image>": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", chat_template=template)


SAMPLE = Sample(id="s", prompt="How many circles?", reference="3",
                images=[Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4))])


def test_tokenizer_with_multimodal_template():
    out = build_prompt(SAMPLE, _tokenizer(VLM_TEMPLATE), "qwen2_5_vl", system_prompt="Be brief.")
    assert out == "<|system|>Be brief.<|end|><|user|>[IMG][IMG]How many circles?<|end|><|assistant|>"


def test_tokenizer_with_text_template_inlines_placeholders():
    tok = _tokenizer(TEXT_TEMPLATE)
    assert build_prompt(SAMPLE, tok, "llava") == \
        "### user: <image>\n<image>\nHow many circles?\n### assistant:"
    qwen = build_prompt(SAMPLE, tok, "qwen2_5_vl")
    assert qwen.count("<|vision_start|><|image_pad|><|vision_end|>\n") == 2
    assert build_prompt(SAMPLE, tok, image_placeholder="<im>").startswith("### user: <im>\n<im>\nHow")


def test_processor_like_object_uses_its_or_its_tokenizers_template():
    class Processor:  # what matters: apply_chat_template + chat_template, or a tokenizer that has them
        image_processor = object()

        def __init__(self, tokenizer, chat_template=None):
            self.tokenizer = tokenizer
            self.chat_template = chat_template

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            return [self.tokenizer.apply_chat_template(messages, tokenize=tokenize,
                                                       add_generation_prompt=add_generation_prompt,
                                                       chat_template=self.chat_template)]

    p = Processor(_tokenizer(), chat_template=VLM_TEMPLATE)
    assert build_prompt(SAMPLE, p, "qwen2_5_vl") == "<|user|>[IMG][IMG]How many circles?<|end|><|assistant|>"
    # no template on the processor: its tokenizer's is used
    p2 = Processor(_tokenizer(VLM_TEMPLATE))
    assert build_prompt(SAMPLE, p2).endswith("[IMG][IMG]How many circles?<|end|><|assistant|>")


def test_fallback_without_a_chat_template():
    text_only = Sample(id="t", prompt="Hi")
    assert build_prompt(SAMPLE, None, "llava") == "USER: <image>\n<image>\nHow many circles? ASSISTANT:"
    assert build_prompt(text_only, None) == "USER: Hi ASSISTANT:"
    assert build_prompt(text_only, _tokenizer(None), system_prompt="S") == "S\nUSER: Hi ASSISTANT:"
    assert build_prompt(SAMPLE, object(), "qwen2_vl").startswith(
        "USER: <|vision_start|><|image_pad|><|vision_end|>\n<|vision_start|>")


def test_messages_and_placeholders():
    msgs = build_messages(SAMPLE, "sys")
    assert msgs[0] == {"role": "system", "content": [{"type": "text", "text": "sys"}]}
    assert msgs[1]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "How many circles?"}]
    assert image_placeholder_for("Qwen2.5-VL") == "<|vision_start|><|image_pad|><|vision_end|>"
    assert image_placeholder_for("unknown") == image_placeholder_for(None) == "<image>"
    with pytest.raises(ValueError, match="content_format"):
        build_prompt(SAMPLE, _tokenizer(VLM_TEMPLATE), content_format="xml")
    forced = build_prompt(SAMPLE, _tokenizer(VLM_TEMPLATE), content_format="string")
    assert forced == "<|user|><image>\n<image>\nHow many circles?<|end|><|assistant|>"
