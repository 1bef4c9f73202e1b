"""The model-family registry: one record per family that config validation, the converters and the trainer
ask; and each family's prompt format (what ``data/prompt.py``'s chat-template builder used to promise for
the image placeholders and the LLaVA-1.5 form is asserted here on the token ids the trainer really uses)."""

from __future__ import annotations

import dataclasses

import pytest
from PIL import Image

from megatron_rcpa.data import Sample
from megatron_rcpa.models import families

SAMPLE = Sample(id="s", prompt="How many circles?", reference="3",
                images=[Image.new("RGB", (56, 56)), Image.new("RGB", (28, 28), color=(200, 10, 10))])
TEXT = Sample(id="t", prompt="Hi", reference="\\boxed{1}")


def test_registry_names_and_lookups():
    assert families.names() == ["qwen2_5_vl", "llava", "llama", "qwen2"]
    assert families.trainable_names() == ["qwen2_5_vl", "llava", "llama", "qwen2"]
    assert families.get("llava").architectures == ("LlavaForConditionalGeneration",)
    with pytest.raises(ValueError, match="unknown model family 'mamba'; known: .*'qwen2_5_vl'"):
        families.get("mamba")
    with pytest.raises(ValueError, match="registered already"):
        families.register(dataclasses.replace(families.get("llava")))


def test_family_detection_from_config_json():
    from megatron_rcpa.convert.errors import ConversionError
    from megatron_rcpa.convert.families import family_by_name, family_for_config

    assert family_for_config({"architectures": ["LlamaForCausalLM"]}).name == "llama"
    assert family_for_config({"architectures": ["Qwen2ForCausalLM"]}).name == "qwen2"
    assert family_for_config({"model_type": "qwen2"}).name == "qwen2"
    assert family_for_config({"architectures": ["LlavaForConditionalGeneration"]}).name == "llava"
    assert family_for_config({"architectures": ["Qwen2_5_VLForConditionalGeneration"]}) is families.get("qwen2_5_vl")
    with pytest.raises(ConversionError, match="unknown architecture.*LlamaForCausalLM"):
        family_for_config({"architectures": ["MistralForCausalLM"]})
    with pytest.raises(ConversionError, match="unknown model family 'gpt'"):  # no checkpoint format
        family_by_name("gpt")


def test_config_validation_reads_the_registry():
    from megatron_rcpa.train.config import ModelConfig

    for name in families.names():
        assert ModelConfig(family=name).family == name
    with pytest.raises(ValueError, match="family.*mamba"):
        ModelConfig(family="mamba")
    families.register(families.Family(name="test_only_family", description="registered by this test",
                                      trainable=False))
    try:
        assert ModelConfig(family="test_only_family").family == "test_only_family"
    finally:
        families._REGISTRY.pop("test_only_family")


def _prompt_format(name):
    family = families.get(name)
    tok, hf = family.tiny_tokenizer_and_config()
    return tok, hf, family.make_prompt_format(tok, hf)


def test_qwen2_5_vl_prompt_is_chatml_with_one_vision_run_per_image():
    tok, hf, fmt = _prompt_format("qwen2_5_vl")
    p = fmt(SAMPLE)
    ids = [tok.token_id(n) for n in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")]
    start, pad, end = ids
    assert p.prompt_ids[0] == tok.token_id("<|im_start|>") and p.prompt_ids.count(start) == 2
    assert p.prompt_ids.count(end) == 2
    # the 56x56 image is 4x4 patches of 14 -> 4 merged tokens; the 28x28 one is below the processor's
    # min_pixels (56*56) and smart_resize scales it up to 56x56 as Qwen2VLImageProcessor does (it was 1 token
    # before the processor's resize rule ran on every image): 4 tokens too
    runs = [i for i, t in enumerate(p.prompt_ids) if t == start]
    assert p.prompt_ids[runs[0]:runs[0] + 6] == [start] + [pad] * 4 + [end]
    assert p.prompt_ids[runs[1]:runs[1] + 6] == [start] + [pad] * 4 + [end]
    assert p.image_grid_thw.tolist() == [[1, 4, 4], [1, 4, 4]] and p.pixel_values.shape[0] == 32
    # the character tokenizer's ChatML chat template: the same ids as the hand-built ChatML
    head = [tok.token_id("<|im_start|>")] + tok.encode("user\n")
    assert p.prompt_ids[:runs[0]] == head
    tail = (tok.encode("How many circles?") + [tok.token_id("<|im_end|>")] + tok.encode("\n")
            + [tok.token_id("<|im_start|>")] + tok.encode("assistant\n"))
    assert p.prompt_ids[-len(tail):] == tail
    assert p.reference_ids == tok.encode("3") + [tok.eos_token_id]
    assert set(ids) <= set(fmt.structural_ids()) and tok.eos_token_id not in fmt.structural_ids()
    rows = [type("Row", (), {"prompt_id": i})() for i in (0, 0, 1)]
    text = fmt(TEXT)
    assert text.pixel_values is None and start not in text.prompt_ids
    inputs = fmt.micro_batch_inputs([p, text], rows)
    assert inputs["pixel_values"].shape[0] == 64 and inputs["image_grid_thw"].shape == (4, 3)
    assert fmt.micro_batch_inputs([p, text], rows[2:]) == {}


def _chatml(tok, user):
    """The character tokenizer's chat template for one user turn (``user``: ids of its content)."""
    return ([tok.token_id("<|im_start|>")] + tok.encode("user\n") + user + [tok.token_id("<|im_end|>")]
            + tok.encode("\n") + [tok.token_id("<|im_start|>")] + tok.encode("assistant\n"))


def test_llava_prompt_uses_the_chat_template_with_image_tokens():
    # the tiny demo's character tokenizer has a ChatML chat template now (was the hand-built LLaVA-1.5 form,
    # which stays for tokenizers without a template: tests/models/test_chat_templates.py)
    tok, hf, fmt = _prompt_format("llava")
    p = fmt(SAMPLE)
    image = hf.image_token_id
    per_image = fmt.vision.tokens_per_image
    assert p.prompt_ids == _chatml(tok, [image] * (2 * per_image) + tok.encode("How many circles?"))
    assert tuple(p.pixel_values.shape) == (2, 3, 28, 28) and p.image_grid_thw is None
    assert fmt(TEXT).prompt_ids == _chatml(tok, tok.encode("Hi"))
    assert image in fmt.structural_ids()


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_text_prompt_refuses_images(name):
    tok, hf, fmt = _prompt_format(name)
    # the character tokenizer's chat template (was "User: Hi\nAssistant:", kept for tokenizers without one)
    assert fmt(TEXT).prompt_ids == _chatml(tok, tok.encode("Hi"))
    with pytest.raises(ValueError, match=f"sample 's' has images but model.family='{name}' is a text model"):
        fmt(SAMPLE)


def test_unknown_family_is_refused_by_the_trainer():
    from megatron_rcpa.train.families import adapter_for

    with pytest.raises(ValueError, match="unknown model family 'gpt'"):
        adapter_for("gpt", None, None)
