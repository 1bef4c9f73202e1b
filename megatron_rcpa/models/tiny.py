"""Tiny random Qwen2.5-VL, LLaVA and Llama / Qwen2 checkpoints built from config (no hub), for tests, demos and
smoke runs (each family's record in :mod:`megatron_rcpa.models.families` points at its factory here).

    path = save_tiny_qwen2_5_vl("/tmp/tiny", num_key_value_heads=1, tie_word_embeddings=True)

writes ``config.json``, ``model.safetensors`` (sharded with an index when ``max_shard_size`` is given),
``generation_config.json``, a word-level tokenizer (``tokenizer.json``, ``tokenizer_config.json``) with the
Qwen2.5-VL special tokens at the config's ids, a ``preprocessor_config.json`` and a ``chat_template.jinja``
(Qwen2-VL's own template, :data:`QWEN2_VL_CHAT_TEMPLATE`), so ``AutoProcessor.from_pretrained`` loads it offline.
The tiny LLaVA saves LLaVA-1.5's template, a BOS-adding tokenizer and a ``processor_config.json``; the tiny text
LMs save (``with_tokenizer=True``) an instruct template (Qwen2-Instruct's ChatML, Llama-3-Instruct's).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

import torch

__all__ = ["perturb_norms_and_biases", "save_tiny_llava", "save_tiny_qwen2_5_vl", "save_tiny_text_lm",
           "tiny_llava_config", "tiny_qwen2_5_vl_config", "tiny_text_lm_config"]

# What Qwen2VLImageProcessor.save_pretrained writes (written by hand: that class needs PIL or torchvision).
_PREPROCESSOR = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "merge_size": 2, "patch_size": 14, "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"longest_edge": 1003520, "shortest_edge": 3136},
    "temporal_patch_size": 2,
}
_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>")

#: Qwen2-VL / Qwen2.5-VL-Instruct's chat template (the default system turn, one vision run per image part).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: llava-hf/llava-1.5's chat template (images first in a turn, then its text).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
#: Qwen2-Instruct's chat template (text).
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
#: Meta-Llama-3-Instruct's chat template (BOS written by the template).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@torch.no_grad()
def perturb_norms_and_biases(model: torch.nn.Module, is_norm: Callable[[str], bool] = lambda name: "norm" in name
                             ) -> None:
    """Make a freshly built model's norms (``is_norm(name)``: 1 + N(0, 0.1)) and other biases (N(0, 0.05))
    non-trivial, so that a mixed-up tensor shows in the logits. Draws from torch's global generator."""
    for name, param in model.named_parameters():
        if is_norm(name):
            param.copy_(1.0 + 0.1 * torch.randn_like(param))
        elif name.endswith(".bias"):
            param.copy_(0.05 * torch.randn_like(param))


def tiny_qwen2_5_vl_config(*, vocab_size: int = 301, hidden_size: int = 64, num_layers: int = 2,
                           num_attention_heads: int = 4, num_key_value_heads: int = 2, intermediate_size: int = 128,
                           tie_word_embeddings: bool = False, vision_depth: int = 2, vision_hidden_size: int = 32,
                           mrope_section=(2, 3, 3), rope_theta: float = 10000.0, **overrides: Any):
    """A Qwen2_5_VLConfig with tiny sizes; the special tokens take the last seven ids of the vocabulary."""
    from transformers import Qwen2_5_VLConfig

    endoftext, im_start, im_end, vstart, vend, image, video = range(vocab_size - len(_SPECIAL), vocab_size)
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=num_layers, num_attention_heads=num_attention_heads,
                num_key_value_heads=num_key_value_heads, max_position_embeddings=1024, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta,
                                 "mrope_section": list(mrope_section)},
                tie_word_embeddings=tie_word_embeddings, bos_token_id=endoftext, eos_token_id=im_end,
                pad_token_id=endoftext)
    vision = dict(depth=vision_depth, hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
                  num_heads=2, out_hidden_size=hidden_size, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, fullatt_block_indexes=[vision_depth - 1])
    kwargs = dict(text_config=text, vision_config=vision, image_token_id=image, video_token_id=video,
                  vision_start_token_id=vstart, vision_end_token_id=vend, tie_word_embeddings=tie_word_embeddings)
    kwargs.update(overrides)
    return Qwen2_5_VLConfig(**kwargs)


def _save_tokenizer(path: str, vocab_size: int, specials=_SPECIAL, eos: str = "<|im_end|>",
                    pad: str = "<|endoftext|>", chat_template: Optional[str] = QWEN2_VL_CHAT_TEMPLATE,
                    bos: Optional[str] = None) -> None:
    """A word-level tokenizer: ``w0``..``wN`` then ``specials`` at the last ids of the vocabulary; ``bos``: a
    special token the tokenizer puts first (``add_special_tokens=True``), as Llama's does; ``chat_template``
    (None: none) is saved as ``chat_template.jinja``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    regular = vocab_size - len(specials)
    vocab = {f"w{i}": i for i in range(regular)}
    vocab.update({tok: regular + i for i, tok in enumerate(specials)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos is not None:
        core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                            special_tokens=[(bos, vocab[bos])])
    named = {"eos_token": eos, "pad_token": pad, **({"bos_token": bos} if bos else {})}
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0", **named,
                                  additional_special_tokens=[t for t in specials if t not in named.values()])
    tok.save_pretrained(path)
    if chat_template is not None:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(chat_template)


def save_tiny_qwen2_5_vl(path: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                         max_shard_size: Optional[str] = None, with_assets: bool = True, **config_kwargs: Any) -> str:
    """Build a random tiny Qwen2.5-VL from config and save it (safetensors + assets) under ``path``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = tiny_qwen2_5_vl_config(**config_kwargs)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(dtype).eval()
    perturb_norms_and_biases(model, lambda name: name.endswith("norm.weight") or "layernorm" in name
                             or name.endswith("ln_q.weight"))
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if with_assets:
        _save_tokenizer(path, config.text_config.vocab_size)
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump(_PREPROCESSOR, f, indent=2)
    return path


# ------------------------------------------------------------------------------------------------ LLaVA
#: What CLIPImageProcessor / SiglipImageProcessor save, for tiny LLaVA checkpoints (normalisation read by
#: the parity gate); ``size`` / ``crop_size`` are filled in from the vision config.
_LLAVA_PREPROCESSOR = {
    "clip": {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "do_center_crop": True,
             "do_rescale": True, "rescale_factor": 0.00392156862745098, "do_normalize": True,
             "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
             "do_convert_rgb": True, "resample": 3},
    "siglip": {"image_processor_type": "SiglipImageProcessor", "do_resize": True, "do_rescale": True,
               "rescale_factor": 0.00392156862745098, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
               "image_std": [0.5, 0.5, 0.5], "resample": 3},
}


def tiny_llava_config(*, vision: str = "clip", text: str = "llama", vocab_size: int = 301, hidden_size: int = 64,
                      num_layers: int = 2, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                      intermediate_size: int = 128, tie_word_embeddings: bool = False, vision_layers: int = 3,
                      vision_hidden_size: int = 32, vision_heads: int = 4, image_size: int = 28, patch_size: int = 14,
                      **overrides: Any):
    """A LlavaConfig with tiny sizes: a CLIP or SigLIP tower (``vision``) and a Llama or Qwen2 language model
    (``text``); the image token is the last id of the vocabulary."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, Qwen2Config, SiglipVisionConfig

    vision_cls = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[vision]
    text_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[text]
    vc = vision_cls(hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
                    num_hidden_layers=vision_layers, num_attention_heads=vision_heads, image_size=image_size,
                    patch_size=patch_size)
    tc = text_cls(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_attention_heads,
                  num_key_value_heads=num_key_value_heads, max_position_embeddings=256, rms_norm_eps=1e-6,
                  tie_word_embeddings=tie_word_embeddings)
    kwargs = dict(vision_config=vc.to_dict(), text_config=tc.to_dict(), image_token_id=vocab_size - 1,
                  tie_word_embeddings=tie_word_embeddings, image_seq_length=(image_size // patch_size) ** 2)
    kwargs.update(overrides)
    return LlavaConfig(**kwargs)


def save_tiny_llava(path: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    max_shard_size: Optional[str] = None, with_assets: bool = True, **config_kwargs: Any) -> str:
    """Build a random tiny LlavaForConditionalGeneration from config and save it (safetensors, and with
    ``with_assets`` a ``preprocessor_config.json``, a ``processor_config.json`` and a word-level tokenizer whose
    last ids are ``<s>`` (BOS, added by the tokenizer), ``</s>``, ``<pad>``, ``<image>``, with LLaVA-1.5's chat
    template) under ``path``."""
    from transformers import LlavaForConditionalGeneration

    config = tiny_llava_config(**config_kwargs)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    perturb_norms_and_biases(model)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if with_assets:
        vision = "clip" if config.vision_config.model_type == "clip_vision_model" else "siglip"
        side = config.vision_config.image_size
        settings = dict(_LLAVA_PREPROCESSOR[vision], size={"height": side, "width": side})
        if vision == "clip":
            settings.update(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump(settings, f, indent=2)
        if config.image_token_id == config.text_config.vocab_size - 1:  # the default layout: "<image>" last
            _save_tokenizer(path, config.text_config.vocab_size, specials=("<s>", "</s>", "<pad>", "<image>"),
                            eos="</s>", pad="<pad>", bos="<s>", chat_template=LLAVA_CHAT_TEMPLATE)
            # what LlavaProcessor.save_pretrained writes besides the image processor's settings
            with open(os.path.join(path, "processor_config.json"), "w") as f:
                json.dump({"processor_class": "LlavaProcessor", "image_token": "<image>",
                           "patch_size": config.vision_config.patch_size, "num_additional_image_tokens": 1,
                           "vision_feature_select_strategy": config.vision_feature_select_strategy}, f, indent=2)
    return path


# ------------------------------------------------------------------------------------- Llama / Qwen2 text LMs
def tiny_text_lm_config(model_type: str, *, vocab_size: int = 301, hidden_size: int = 64,
                        intermediate_size: int = 128, num_layers: int = 2, num_attention_heads: int = 4,
                        num_key_value_heads: int = 2, max_position_embeddings: int = 256,
                        tie_word_embeddings: bool = False, **overrides: Any):
    """A LlamaConfig (``model_type="llama"``) or Qwen2Config (``"qwen2"``) with tiny sizes."""
    import transformers

    classes = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}
    if model_type not in classes:
        raise ValueError(f"tiny_text_lm_config: model_type={model_type!r}, expected one of {sorted(classes)}")
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_attention_heads,
                  num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
                  tie_word_embeddings=tie_word_embeddings)
    kwargs.update(overrides)
    return classes[model_type](**kwargs)


#: The tiny text LMs' tokenizers (``with_tokenizer``): (specials, eos, pad, bos, chat template) per model type.
_TEXT_TOKENIZERS = {
    "qwen2": (("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|im_end|>", "<|endoftext|>", None,
              QWEN2_CHAT_TEMPLATE),
    "llama": (("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
              "<|eot_id|>", "<|end_of_text|>", "<|begin_of_text|>", LLAMA3_CHAT_TEMPLATE),
}


def save_tiny_text_lm(path: str, model_type: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                      with_tokenizer: bool = False, chat_template: bool = True, **config_kwargs: Any) -> str:
    """Build a random tiny Llama / Qwen2 causal LM (norms and biases made non-trivial) and save it (safetensors;
    with ``with_tokenizer`` a word-level tokenizer with the instruct model's specials, BOS for Llama, and, with
    ``chat_template``, Qwen2-Instruct's / Llama-3-Instruct's template) under ``path``. Defaults: RMSNorm eps
    1e-6, RoPE theta 1e4 (Llama) / 1e6 (Qwen2)."""
    import transformers

    config_kwargs.setdefault("rms_norm_eps", 1e-6)
    config_kwargs.setdefault("rope_parameters", {"rope_type": "default",
                                                 "rope_theta": 10000.0 if model_type == "llama" else 1.0e6})
    config = tiny_text_lm_config(model_type, **config_kwargs)
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[model_type]
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    perturb_norms_and_biases(model)
    model.save_pretrained(path)
    if with_tokenizer:
        specials, eos, pad, bos, template = _TEXT_TOKENIZERS[model_type]
        _save_tokenizer(path, config.vocab_size, specials=specials, eos=eos, pad=pad, bos=bos,
                        chat_template=template if chat_template else None)
    return path
