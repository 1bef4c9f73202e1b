"""Plain text LMs (HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``) as a Megatron-Core policy at any TP/PP.

Layout: ``language_model`` is a megatron ``GPTModel`` (local layer spec, RoPE) configured by the same code
as Qwen2.5-VL's decoder (:func:`~megatron_rcpa.models.decoder.decoder_transformer_config`): RMSNorm,
SwiGLU, GQA, QKV bias for Qwen2 (none for Llama), tied or untied embeddings, the vocabulary padded to
``padded_vocab_size`` (zero rows). Parameter names match
:func:`~megatron_rcpa.convert.weight_maps.decoder_tensor_maps` with ``megatron_prefix="language_model."``.

:class:`TextLMPolicy` has the shared forward of every policy
(:meth:`~megatron_rcpa.models.policy_base.DecoderPolicy.forward`) (``pixel_values`` / ``image_grid_thw``
must be None): vocab-parallel logits ``[B, S, padded_vocab / TP]`` (padding columns hold
:data:`~megatron_rcpa.models.policy_base.PADDED_VOCAB_LOGIT`), per-token cross entropy with ``labels``,
``loss_fn(logits)``, and prefill / incremental decoding with a :class:`~megatron_rcpa.models.inference.KVCache`.
Positions are 0..S-1 per row, as a transformers forward without ``position_ids`` uses them.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from megatron_rcpa.models.decoder import DecoderDims
from megatron_rcpa.models.policy_base import DecoderPolicy, build_decoder_policy

__all__ = [
    "TEXT_MODEL_TYPES",
    "TextLMPolicy",
    "build_text_policy",
    "text_lm_decoder_dims",
    "text_lm_hf_config",
]

#: HF model_type -> (config class name, QKV bias)
TEXT_MODEL_TYPES = {"llama": ("LlamaConfig", False), "qwen2": ("Qwen2Config", True)}


def text_lm_hf_config(hf_config: Any, model_type: Optional[str] = None):
    """An HF ``LlamaConfig`` / ``Qwen2Config`` from a config object or its ``config.json`` dict.

    ``model_type`` (optional) is the one expected; ValueError for another (or an unsupported) model type."""
    import transformers

    if isinstance(hf_config, dict):
        kind = hf_config.get("model_type")
        if kind not in TEXT_MODEL_TYPES:
            raise ValueError(f"expected a config of model_type in {sorted(TEXT_MODEL_TYPES)}, got {kind!r}")
        cls = getattr(transformers, TEXT_MODEL_TYPES[kind][0])
        hf_config = cls.from_dict({k: v for k, v in copy.deepcopy(hf_config).items() if k != "model_type"})
    kind = getattr(hf_config, "model_type", None)
    if kind not in TEXT_MODEL_TYPES or (model_type is not None and kind != model_type):
        want = model_type or sorted(TEXT_MODEL_TYPES)
        raise ValueError(f"expected a {want} config, got model_type={kind!r}")
    return hf_config


def text_lm_decoder_dims(hf_config: Any) -> DecoderDims:
    """The decoder sizes of a Llama / Qwen2 config; ValueError for what the megatron decoder cannot hold."""
    hf_config = text_lm_hf_config(hf_config)
    kind = hf_config.model_type
    if kind == "llama":
        for flag in ("attention_bias", "mlp_bias"):
            if getattr(hf_config, flag, False):
                raise ValueError(f"{flag}=True in the Llama config is not supported (the megatron decoder has "
                                 "QKV bias only for Qwen2-style models, and no output/MLP biases)")
    dims = DecoderDims.from_hf_text_config(hf_config, qkv_bias=TEXT_MODEL_TYPES[kind][1],
                                          tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)))
    if dims.mrope_section is not None:
        raise ValueError("rope_parameters has 'mrope_section': not a plain text model")
    return dims


class TextLMPolicy(DecoderPolicy):
    """A Llama / Qwen2 text LM (one pipeline stage of it). Build it with :func:`build_text_policy`.

    Its forward is the shared one: RoPE positions 0..S-1, no image inputs (a ValueError names them)."""

    def __init__(self, hf_config: Any, config, *, padded_vocab_size: int, pre_process: bool = True,
                 post_process: bool = True, transformer_layer_spec=None) -> None:
        super().__init__(config=config)
        hf_config = text_lm_hf_config(hf_config)
        self._build_language_model(hf_config, text_lm_decoder_dims(hf_config), config,
                                   padded_vocab_size=padded_vocab_size, pre_process=pre_process,
                                   post_process=post_process, transformer_layer_spec=transformer_layer_spec)
        self.vision_model = None  # the VLM policies' attribute, for code that looks for it


def build_text_policy(hf_config: Any, **kwargs: Any) -> TextLMPolicy:
    """Build this rank's stage of a Llama / Qwen2 text policy at the current megatron TP/PP layout (keywords of
    :func:`~megatron_rcpa.models.policy_base.build_decoder_policy`; VLM-only keywords such as
    ``vision_attn_implementation`` are accepted and ignored)."""
    hf_config = text_lm_hf_config(hf_config)
    kwargs.pop("vision_attn_implementation", None)

    def make(config, *, tp, dtype, perform_initialization, **stage: Any) -> TextLMPolicy:
        return TextLMPolicy(hf_config, config, **stage)

    return build_decoder_policy(make, text_lm_decoder_dims(hf_config), what="text LM", **kwargs)
