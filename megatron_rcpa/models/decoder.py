"""The Qwen2 / Llama text tower as a megatron ``TransformerConfig``: written once, shared by every family.

:class:`DecoderDims` reads the sizes that matter from an HF text config (Qwen2, Qwen2.5-VL text, Llama);
:func:`decoder_transformer_config` turns them into a megatron ``TransformerConfig`` for the local (non-TE)
layer spec (RMSNorm, SwiGLU, optional QKV bias, GQA); :func:`check_parallel_layout` says, before anything
is built, whether a TP/PP layout can hold the model, naming the value that does not divide.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import torch

__all__ = [
    "DecoderDims",
    "check_parallel_layout",
    "decoder_transformer_config",
    "pad_vocab_size",
    "parse_dtype",
]

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "torch.float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "torch.bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "torch.float16": torch.float16,
}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def parse_dtype(value: Any) -> torch.dtype:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16 (likewise fp32, fp16)."""
    if isinstance(value, torch.dtype):
        if value not in _DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {value}; expected one of fp32, bf16, fp16")
        return value
    key = str(value).lower()
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {value!r}; expected one of fp32, bf16, fp16")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[parse_dtype(dtype)]


def pad_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """Round ``vocab_size`` up to a multiple of ``divisible_by`` (the padded rows hold zeros)."""
    if divisible_by < 1:
        raise ValueError(f"make_vocab_size_divisible_by must be >= 1, got {divisible_by}")
    return -(-int(vocab_size) // divisible_by) * divisible_by


def _get(config: Any, name: str, default: Any = None) -> Any:
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


@dataclasses.dataclass(frozen=True)
class DecoderDims:
    """The sizes of a Qwen2/Llama-style decoder, read from an HF text config."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    qkv_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    hidden_act: str = "silu"
    mrope_section: Optional[Sequence[int]] = None

    @classmethod
    def from_hf_text_config(cls, text_config: Any, *, qkv_bias: bool, tie_word_embeddings: bool) -> DecoderDims:
        """Read a Qwen2 / Qwen2.5-VL text / Llama config (an HF config object or its dict)."""
        heads = int(_get(text_config, "num_attention_heads"))
        hidden = int(_get(text_config, "hidden_size"))
        kv = _get(text_config, "num_key_value_heads") or heads
        head_dim = _get(text_config, "head_dim") or hidden // heads
        rope = _get(text_config, "rope_parameters") or _get(text_config, "rope_scaling") or {}
        theta = rope.get("rope_theta", _get(text_config, "rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope", None):
            raise ValueError(f"rope_type={rope_type!r} in the text config is not supported (only 'default' RoPE "
                             "with optional mrope_section)")
        if _get(text_config, "use_sliding_window", False):
            raise ValueError("use_sliding_window=True in the text config is not supported")
        act = _get(text_config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} in the text config is not supported (only 'silu' / SwiGLU)")
        mrope = rope.get("mrope_section")
        return cls(
            num_layers=int(_get(text_config, "num_hidden_layers")),
            hidden_size=hidden,
            ffn_hidden_size=int(_get(text_config, "intermediate_size")),
            num_attention_heads=heads,
            num_kv_heads=int(kv),
            head_dim=int(head_dim),
            vocab_size=int(_get(text_config, "vocab_size")),
            norm_eps=float(_get(text_config, "rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            qkv_bias=bool(qkv_bias),
            tie_word_embeddings=bool(tie_word_embeddings),
            max_position_embeddings=int(_get(text_config, "max_position_embeddings", 32768)),
            hidden_act=act,
            mrope_section=tuple(int(s) for s in mrope) if mrope is not None else None,
        )


def check_parallel_layout(dims: DecoderDims, *, tp: int, pp: int, padded_vocab_size: int,
                          num_layers_in_first_pipeline_stage: Optional[int] = None,
                          num_layers_in_last_pipeline_stage: Optional[int] = None) -> None:
    """Raise ValueError naming the first size that the TP/PP layout does not divide (with uneven first/last
    pipeline stages, the layers the other stages share)."""
    from megatron_rcpa.models.parallel_knobs import stage_layers

    if tp < 1 or pp < 1:
        raise ValueError(f"tensor/pipeline parallel sizes must be >= 1, got TP={tp} PP={pp}")
    checks = [
        ("num_attention_heads", dims.num_attention_heads, tp, "TP"),
        ("num_key_value_heads", dims.num_kv_heads, tp, "TP"),
        ("intermediate_size", dims.ffn_hidden_size, tp, "TP"),
        ("padded vocab size", padded_vocab_size, tp, "TP"),
    ]
    for name, value, size, what in checks:
        if value % size:
            raise ValueError(f"{what}={size} does not divide {name}={value}")
    stage_layers(dims.num_layers, pp, num_layers_in_first_pipeline_stage, num_layers_in_last_pipeline_stage)
    if dims.num_attention_heads % dims.num_kv_heads:
        raise ValueError(f"num_key_value_heads={dims.num_kv_heads} does not divide "
                         f"num_attention_heads={dims.num_attention_heads}")
    if dims.mrope_section is not None and 2 * sum(dims.mrope_section) != dims.head_dim:
        raise ValueError(f"mrope_section={list(dims.mrope_section)} must sum to head_dim/2 = {dims.head_dim // 2}")


def decoder_transformer_config(dims: DecoderDims, *, tp: int, pp: int, params_dtype: torch.dtype = torch.float32,
                               perform_initialization: bool = True, **overrides: Any):
    """A megatron ``TransformerConfig`` for this decoder on the local (non-TE) layer spec.

    ``overrides`` are passed to ``TransformerConfig`` last (e.g. the memory knobs of
    :func:`~megatron_rcpa.models.parallel_knobs.transformer_overrides`: recompute, ``sequence_parallel``, uneven
    pipeline stages; or ``init_method_std``).
    """
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    params_dtype = parse_dtype(params_dtype)
    kwargs = dict(
        num_layers=dims.num_layers,
        hidden_size=dims.hidden_size,
        ffn_hidden_size=dims.ffn_hidden_size,
        num_attention_heads=dims.num_attention_heads,
        num_query_groups=dims.num_kv_heads,
        kv_channels=dims.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=dims.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=dims.qkv_bias,
        rotary_interleaved=False,  # HF Qwen2/Llama rotate_half convention
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        use_cpu_initialization=True,
        perform_initialization=perform_initialization,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        mrope_section=list(dims.mrope_section) if dims.mrope_section is not None else None,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
