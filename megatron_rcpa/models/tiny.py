"""Tiny random Qwen2.5-VL, LLaVA and Llama / Qwen2 checkpoints built from config (no hub), for tests, demos and
smoke runs (each family's record in :mod:`megatron_rcpa.models.families` points at its factory here).

    path = save_tiny_qwen2_5_vl("/tmp/tiny", num_key_value_heads=1, tie_word_embeddings=True)

writes ``config.json``, ``model.safetensors`` (sharded with an index when ``max_shard_size`` is given),
``generation_config.json``, a word-level tokenizer (``tokenizer.json``, ``tokenizer_config.json``) with the
Qwen2.5-VL special tokens at the config's ids, a ``preprocessor_config.json`` and a ``chat_template.jinja``.
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
                    pad: str = "<|endoftext|>", chat_template: bool = True) -> None:
    """A word-level tokenizer: ``w0``..``wN`` then ``specials`` at the last ids of the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    regular = vocab_size - len(specials)
    vocab = {f"w{i}": i for i in range(regular)}
    vocab.update({tok: regular + i for i, tok in enumerate(specials)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0", eos_token=eos, pad_token=pad,
                                  additional_special_tokens=[t for t in specials if t not in (eos, pad)])
    tok.save_pretrained(path)
    if chat_template:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}")


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
    ``with_assets`` a ``preprocessor_config.json`` and a word-level tokenizer whose last ids are ``</s>``,
    ``<pad>``, ``<image>``) under ``path``."""
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
            _save_tokenizer(path, config.text_config.vocab_size, specials=("</s>", "<pad>", "<image>"), eos="</s>",
                            pad="<pad>", chat_template=False)
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


def save_tiny_text_lm(path: str, model_type: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                      **config_kwargs: Any) -> str:
    """Build a random tiny Llama / Qwen2 causal LM (norms and biases made non-trivial) and save it (safetensors,
    no tokenizer) under ``path``. Defaults: RMSNorm eps 1e-6, RoPE theta 1e4 (Llama) / 1e6 (Qwen2)."""
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
    return path
