"""Prompts through the checkpoint's chat template (issue 15): the token ids each family's PromptFormat builds
equal what transformers' processor (vision families) or tokenizer (text families) produces for the same
conversation and images, on tiny checkpoints saved by the families' ``save_tiny_hf`` (their tokenizers carry
the real Qwen2-VL / LLaVA-1.5 / Qwen2-Instruct / Llama-3-Instruct templates). Without a template the
built-in formats stay (said once in the log); the character tokenizer renders its own ChatML template.

Without torchvision, ``AutoProcessor`` cannot build Qwen2.5-VL's video processor; the processor is then built
from the same files with its image processor and tokenizer only (images never touch the video processor).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_rcpa.convert.checkpoint import ASSETS_DIR
from megatron_rcpa.data import Sample
from megatron_rcpa.data.char_tokenizer import CharTokenizer, HFTokenizer
from megatron_rcpa.models import families


def _noise(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _save(tmp_path, name, **kwargs):
    """A tiny HF checkpoint of family ``name`` under ``<ck>/hf_assets`` (where a converted checkpoint keeps its
    tokenizer / processor files); returns (ck, assets dir)."""
    ck = tmp_path / name
    assets = str(ck / ASSETS_DIR)
    families.get(name).save_tiny_hf(assets, **kwargs)
    return str(ck), assets


def _format(name, ck, assets, **kwargs):
    from transformers import AutoTokenizer

    family = families.get(name)
    with open(os.path.join(assets, "config.json")) as f:
        hf = family.hf_config(json.load(f))
    tok = HFTokenizer(AutoTokenizer.from_pretrained(assets, trust_remote_code=False))
    return tok, family.make_prompt_format(tok, hf, checkpoint=ck, **kwargs)


def _qwen_processor(assets):
    from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(assets)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnly(Qwen2_5_VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    tok = AutoTokenizer.from_pretrained(assets)
    return ImageOnly(image_processor=Qwen2VLImageProcessorPil.from_pretrained(assets), tokenizer=tok,
                     chat_template=tok.chat_template)


def _hf_ids(processor, messages):
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
    return out, out["input_ids"][0].tolist()


def _same_text(fmt, sample, processor, messages, vision=True):
    """The rendered prompt text equals transformers' (the tiny word-level tokenizers drop whitespace, so the
    ids alone would not show a missing newline)."""
    ours = fmt.tok.apply_chat_template(fmt.chat_messages(sample, vision=vision), add_generation_prompt=True)
    theirs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours == theirs


def test_tiny_qwen2_5_vl_checkpoint_has_a_chat_template_and_processor_config(tmp_path):
    _, assets = _save(tmp_path, "qwen2_5_vl")
    assert os.path.isfile(os.path.join(assets, "chat_template.jinja"))
    assert os.path.isfile(os.path.join(assets, "preprocessor_config.json"))
    proc = _qwen_processor(assets)
    assert "You are a helpful assistant." in proc.chat_template


def test_qwen2_5_vl_prompt_ids_equal_the_processor(tmp_path):
    ck, assets = _save(tmp_path, "qwen2_5_vl")
    tok, fmt = _format("qwen2_5_vl", ck, assets)
    proc = _qwen_processor(assets)
    img1, img2 = _noise(100, 37, 1), _noise(300, 200, 2)

    # one image, a plain-text prompt: one user turn, the template's default system turn
    sample = Sample(id="a", prompt="w5 w6 w7", reference="w9", images=[img1])
    ours = fmt(sample)
    ref, ids = _hf_ids(proc, [{"role": "user", "content": [{"type": "image", "image": img1},
                                                           {"type": "text", "text": "w5 w6 w7"}]}])
    assert ours.prompt_ids == ids
    _same_text(fmt, sample, proc, [{"role": "user", "content": [{"type": "image"},
                                                                 {"type": "text", "text": "w5 w6 w7"}]}])
    assert fmt.tok.apply_chat_template(fmt.chat_messages(sample)).startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert torch.equal(ours.image_grid_thw, ref["image_grid_thw"])
    torch.testing.assert_close(ours.pixel_values, ref["pixel_values"].float(), atol=1e-4, rtol=0)

    # two images placed by a verl-style message ("<image>" in a string content)
    sample = Sample(id="b", prompt="w3 w4", reference="w9", images=[img1, img2],
                    messages=[{"role": "user", "content": "<image>w3 <image>w4"}])
    ours = fmt(sample)
    ref, ids = _hf_ids(proc, [{"role": "user", "content": [
        {"type": "image", "image": img1}, {"type": "text", "text": "w3 "}, {"type": "image", "image": img2},
        {"type": "text", "text": "w4"}]}])
    assert ours.prompt_ids == ids and ours.prompt_ids.count(tok.token_id("<|image_pad|>")) > 2
    _same_text(fmt, sample, proc, [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "w3 "}, {"type": "image"}, {"type": "text", "text": "w4"}]}])
    assert torch.equal(ours.image_grid_thw, ref["image_grid_thw"])
    torch.testing.assert_close(ours.pixel_values, ref["pixel_values"].float(), atol=1e-4, rtol=0)

    # data.system_prompt replaces the default system turn
    _, fmt_sys = _format("qwen2_5_vl", ck, assets, system_prompt="w1 w2")
    ref, ids = _hf_ids(proc, [{"role": "system", "content": [{"type": "text", "text": "w1 w2"}]},
                              {"role": "user", "content": [{"type": "image", "image": img1},
                                                           {"type": "text", "text": "w3 "},
                                                           {"type": "image", "image": img2},
                                                           {"type": "text", "text": "w4"}]}])
    assert fmt_sys(sample).prompt_ids == ids
    _same_text(fmt_sys, sample, proc, [{"role": "system", "content": [{"type": "text", "text": "w1 w2"}]},
                                       {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w3 "},
                                                                    {"type": "image"},
                                                                    {"type": "text", "text": "w4"}]}])
    # ... and the data's own system turn too
    own = Sample(id="c", prompt="w3", reference="w9", messages=[{"role": "system", "content": "w8"},
                                                                {"role": "user", "content": "w3"}])
    _, ids = _hf_ids(proc, [{"role": "system", "content": [{"type": "text", "text": "w1 w2"}]},
                            {"role": "user", "content": [{"type": "text", "text": "w3"}]}])
    assert fmt_sys(own).prompt_ids == ids


def test_qwen2_5_vl_prompt_image_count_mismatch_names_the_sample(tmp_path):
    ck, assets = _save(tmp_path, "qwen2_5_vl")
    _, fmt = _format("qwen2_5_vl", ck, assets)
    bad = Sample(id="bad", prompt="w1", images=[_noise(56, 56, 0)],
                 messages=[{"role": "user", "content": "<image><image>w1"}])
    with pytest.raises(ValueError, match="sample 'bad': its messages place 2 image"):
        fmt(bad)


def test_qwen2_5_vl_without_a_template_keeps_chatml_and_says_so_once(tmp_path, capsys):
    ck, assets = _save(tmp_path, "qwen2_5_vl")
    os.remove(os.path.join(assets, "chat_template.jinja"))
    families._SAID.clear()
    tok, fmt = _format("qwen2_5_vl", ck, assets)
    _format("qwen2_5_vl", ck, assets)
    assert capsys.readouterr().out.count("no chat template") == 1
    img = _noise(56, 56, 3)
    p = fmt(Sample(id="a", prompt="w5", images=[img]))
    i = tok.token_id
    assert p.prompt_ids == ([i("<|im_start|>")] + tok.encode("user\n") + [i("<|vision_start|>")]
                            + [i("<|image_pad|>")] * 4 + [i("<|vision_end|>")] + tok.encode("w5")
                            + [i("<|im_end|>")] + tok.encode("\n") + [i("<|im_start|>")] + tok.encode("assistant\n"))


def test_llava_prompt_ids_equal_the_processor_with_bos(tmp_path):
    from transformers import AutoProcessor

    ck, assets = _save(tmp_path, "llava")
    tok, fmt = _format("llava", ck, assets)
    proc = AutoProcessor.from_pretrained(assets)
    bos = tok.token_id("<s>")
    img1, img2 = _noise(40, 30, 4), _noise(28, 28, 5)
    for images, text in (([img1], "w5 w6"), ([img1, img2], "w7")):
        ours = fmt(Sample(id="a", prompt=text, images=images))
        ref, ids = _hf_ids(proc, [{"role": "user", "content": [{"type": "image", "image": im} for im in images]
                                   + [{"type": "text", "text": text}]}])
        assert ours.prompt_ids == ids and ids[0] == bos and ids.count(bos) == 1
        _same_text(fmt, Sample(id="a", prompt=text, images=images), proc, [{"role": "user", "content": [
            {"type": "image"} for _ in images] + [{"type": "text", "text": text}]}])
        assert ours.prompt_ids.count(fmt.image_token_id) == fmt.vision.tokens_per_image * len(images)
        torch.testing.assert_close(ours.pixel_values, ref["pixel_values"].float(), atol=1e-4, rtol=0)
    # a system prompt: LLaVA-1.5's template writes it without a role
    _, fmt_sys = _format("llava", ck, assets, system_prompt="w1")
    _, ids = _hf_ids(proc, [{"role": "system", "content": [{"type": "text", "text": "w1"}]},
                            {"role": "user", "content": [{"type": "image", "image": img1},
                                                         {"type": "text", "text": "w5"}]}])
    assert fmt_sys(Sample(id="a", prompt="w5", images=[img1])).prompt_ids == ids


def test_llava_without_a_template_is_the_llava_1_5_form_with_bos(tmp_path):
    from transformers import AutoProcessor

    ck, assets = _save(tmp_path, "llava")
    proc = AutoProcessor.from_pretrained(assets)  # loaded with the template; the prompt text is given directly
    os.remove(os.path.join(assets, "chat_template.jinja"))
    tok, fmt = _format("llava", ck, assets)
    assert fmt.chat_template is None
    img = _noise(30, 30, 6)
    ref = proc(text="USER: <image>\nw5 w6 ASSISTANT:", images=[img], return_tensors="pt")
    assert fmt(Sample(id="a", prompt="w5 w6", images=[img])).prompt_ids == ref["input_ids"][0].tolist()
    assert ref["input_ids"][0, 0].item() == tok.token_id("<s>")


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_text_lm_prompt_ids_equal_the_tokenizer_chat_template(tmp_path, model_type):
    from transformers import AutoTokenizer

    ck, assets = _save(tmp_path, model_type, with_tokenizer=True)
    tok, fmt = _format(model_type, ck, assets)
    hf_tok = AutoTokenizer.from_pretrained(assets)

    def hf(messages):
        out = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    assert fmt(Sample(id="a", prompt="w5 w6")).prompt_ids == hf([{"role": "user", "content": "w5 w6"}])
    chat = [{"role": "user", "content": "w5"}, {"role": "assistant", "content": "w6"},
            {"role": "user", "content": "w7"}]
    assert fmt(Sample(id="b", prompt="w5\nw7", messages=chat)).prompt_ids == hf(chat)
    _same_text(fmt, Sample(id="b", prompt="w5\nw7", messages=chat), hf_tok, chat, vision=False)
    _, fmt_sys = _format(model_type, ck, assets, system_prompt="w1")
    assert (fmt_sys(Sample(id="a", prompt="w5 w6")).prompt_ids
            == hf([{"role": "system", "content": "w1"}, {"role": "user", "content": "w5 w6"}]))
    if model_type == "llama":  # the template writes BOS; apply_chat_template adds no second one
        ids = fmt(Sample(id="a", prompt="w5")).prompt_ids
        assert ids[0] == tok.token_id("<|begin_of_text|>") and ids.count(ids[0]) == 1


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_base_text_lm_keeps_the_user_assistant_form(tmp_path, model_type):
    from transformers import AutoTokenizer

    ck, assets = _save(tmp_path, model_type, with_tokenizer=True, chat_template=False)
    _, fmt = _format(model_type, ck, assets)
    assert fmt.chat_template is None
    hf_tok = AutoTokenizer.from_pretrained(assets)
    # as the tokenizer encodes the text itself (Llama's BOS first)
    assert fmt(Sample(id="a", prompt="w5")).prompt_ids == hf_tok("User: w5\nAssistant:")["input_ids"]


def test_char_tokenizer_renders_its_chatml_template():
    tok = CharTokenizer()
    assert tok.chat_template is not None
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    assert tok.apply_chat_template(msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "How many?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template(msgs[:1], add_generation_prompt=False) == "<|im_start|>system\nBe brief.<|im_end|>\n"
    # special tokens' text is one id each, as in HF tokenizers
    assert tok.encode("a<|im_end|>") == tok.encode("a") + [tok.token_id("<|im_end|>")]
    llava = CharTokenizer(extra_specials=("<image>",))
    assert "<image>Hi" in llava.apply_chat_template([{"role": "user", "content": "<image>Hi"}])
    assert llava.encode("<image>") == [llava.token_id("<image>")]


def test_char_tokenizer_demo_takes_the_system_prompt():
    family = families.get("qwen2_5_vl")
    tok, hf = family.tiny_tokenizer_and_config()
    fmt = family.make_prompt_format(tok, hf, system_prompt="Think.")
    ids = fmt(Sample(id="a", prompt="Hi")).prompt_ids
    assert ids == tok.encode("<|im_start|>system\nThink.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                             "<|im_start|>assistant\n")


def test_data_system_prompt_is_validated():
    from megatron_rcpa.train.config import DataConfig

    assert DataConfig(system_prompt="Be brief.").system_prompt == "Be brief."
    with pytest.raises(ValueError, match="data.system_prompt = 3: expected text or null"):
        DataConfig(system_prompt=3)
