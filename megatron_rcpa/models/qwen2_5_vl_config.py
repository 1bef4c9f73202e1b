"""Qwen2.5-VL HF config helpers that need no megatron import (used by the converters' planning step)."""

from __future__ import annotations

import copy
from typing import Any

from megatron_rcpa.models.decoder import DecoderDims

__all__ = ["qwen2_5_vl_decoder_dims", "qwen2_5_vl_hf_config", "qwen2_5_vl_is_tied"]


def qwen2_5_vl_hf_config(hf_config: Any):
    """An HF ``Qwen2_5_VLConfig`` from a config object or its ``to_dict()`` / ``config.json`` dict."""
    from transformers import Qwen2_5_VLConfig

    if isinstance(hf_config, Qwen2_5_VLConfig):
        return hf_config
    if isinstance(hf_config, dict):
        data = {k: v for k, v in copy.deepcopy(hf_config).items() if k != "model_type"}
        return Qwen2_5_VLConfig.from_dict(data)
    raise TypeError(f"expected a Qwen2_5_VLConfig or its dict, got {type(hf_config).__name__}")


def qwen2_5_vl_is_tied(hf_config: Any) -> bool:
    """Tied input/output embeddings (transformers 5 keeps the flag on the outer config; older saves on
    text_config)."""
    return bool(getattr(hf_config, "tie_word_embeddings", False)
                or getattr(hf_config.text_config, "tie_word_embeddings", False))


def qwen2_5_vl_decoder_dims(hf_config: Any) -> DecoderDims:
    hf_config = qwen2_5_vl_hf_config(hf_config)
    dims = DecoderDims.from_hf_text_config(hf_config.text_config, qkv_bias=True,
                                          tie_word_embeddings=qwen2_5_vl_is_tied(hf_config))
    if dims.mrope_section is None:
        raise ValueError("text_config.rope_parameters has no 'mrope_section' (Qwen2.5-VL needs it)")
    return dims
