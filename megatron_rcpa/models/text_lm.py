"""Plain text LMs (HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``) as a Megatron-Core policy at any TP/PP.

Layout: ``language_model`` is a megatron ``GPTModel`` (local layer spec, RoPE) configured by the same code
as Qwen2.5-VL's decoder (:func:`~megatron_rcpa.models.decoder.decoder_transformer_config`): RMSNorm,
SwiGLU, GQA, QKV bias for Qwen2 (none for Llama), tied or untied embeddings, the vocabulary padded to
``padded_vocab_size`` (zero rows). Parameter names match
:func:`~megatron_rcpa.convert.weight_maps.decoder_tensor_maps` with ``megatron_prefix="language_model."``.

:class:`TextLMPolicy` has the forward signature of the VLM policies (``pixel_values`` / ``image_grid_thw``
must be None): vocab-parallel logits ``[B, S, padded_vocab / TP]`` (padding columns hold
:data:`~megatron_rcpa.models.qwen2_5_vl.PADDED_VOCAB_LOGIT`), per-token cross entropy with ``labels``,
``loss_fn(logits)``, and prefill / incremental decoding with a :class:`~megatron_rcpa.models.inference.KVCache`.
Positions are 0..S-1 per row, as a transformers forward without ``position_ids`` uses them.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from megatron_rcpa.models.decoder import (
    DecoderDims,
    check_parallel_layout,
    decoder_transformer_config,
    pad_vocab_size,
    parse_dtype,
)
from megatron_rcpa.models.policy_base import DecoderPolicy
from megatron_rcpa.models.qwen2_5_vl import _attention_mask

__all__ = [
    "TEXT_MODEL_TYPES",
    "TextLMPolicy",
    "build_text_policy",
    "text_lm_decoder_dims",
    "text_lm_hf_config",
    "text_trainer_forward",
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
    """A Llama / Qwen2 text LM (one pipeline stage of it). Build it with :func:`build_text_policy`."""

    def __init__(self, hf_config: Any, config, *, padded_vocab_size: int, pre_process: bool = True,
                 post_process: bool = True, transformer_layer_spec=None) -> None:
        super().__init__(config=config)
        hf_config = text_lm_hf_config(hf_config)
        self._build_language_model(hf_config, text_lm_decoder_dims(hf_config), config,
                                   padded_vocab_size=padded_vocab_size, pre_process=pre_process,
                                   post_process=post_process, transformer_layer_spec=transformer_layer_spec)
        self.vision_model = None  # the VLM policies' attribute, for code that looks for it

    def _build_language_model(self, hf_config: Any, dims: DecoderDims, config, *, padded_vocab_size: int,
                              pre_process: bool, post_process: bool, transformer_layer_spec=None) -> None:
        """The Llama / Qwen2 decoder as ``self.language_model`` (a GPTModel with RoPE), and the attributes
        :class:`~megatron_rcpa.models.policy_base.DecoderPolicy` reads. Shared with the LLaVA policy."""
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        self.hf_config = hf_config
        self.dims = dims
        self.vocab_size = dims.vocab_size
        self.padded_vocab_size = int(padded_vocab_size)
        self.pre_process = pre_process
        self.post_process = post_process
        self.share_embeddings_and_output_weights = dims.tie_word_embeddings
        self.language_model = GPTModel(
            config=config,
            transformer_layer_spec=transformer_layer_spec or get_gpt_layer_local_spec(normalization="RMSNorm"),
            vocab_size=self.padded_vocab_size,
            max_sequence_length=dims.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=dims.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=dims.rope_theta,
        )

    # ---------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.Tensor] = None,
        *,
        labels: Optional[torch.Tensor] = None,
        loss_fn: Optional[Callable[[torch.Tensor], Any]] = None,
        kv_cache=None,
        runtime_gather_output: bool = False,
    ):
        """One pipeline stage of the policy (same contract as :meth:`Qwen2_5_VLPolicy.forward`).

        Args:
            input_ids: [B, S] token ids.
            position_ids: optional [B, S]; RoPE positions are always 0..S-1 (continuing after the cached
                tokens with ``kv_cache``), so anything else is a ValueError.
            attention_mask: optional [B, S] padding mask (1 = token, 0 = pad); with ``kv_cache`` it covers the
                new tokens only.
            pixel_values, image_grid_thw: must be None (a text model).
            labels / loss_fn / kv_cache / runtime_gather_output: as for the Qwen2.5-VL policy.
        """
        if pixel_values is not None or image_grid_thw is not None:
            raise ValueError("a text LM policy takes no pixel_values / image_grid_thw")
        return self._rope_forward(input_ids, position_ids, attention_mask, labels=labels, loss_fn=loss_fn,
                                  kv_cache=kv_cache, runtime_gather_output=runtime_gather_output)

    def _rope_forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor],
                      attention_mask: Optional[torch.Tensor], *, embed: Optional[Callable[[bool], torch.Tensor]] = None,
                      labels=None, loss_fn=None, kv_cache=None, runtime_gather_output: bool = False):
        """The decoder pass with RoPE positions 0..S-1 (continuing after a KV cache).

        ``embed(prefill)`` (first stage only), if given, returns the decoder input [S, B, H] instead of the
        plain token embeddings; ``prefill`` is False for the decode steps after a KV-cache prefill.
        """
        batch, seq = input_ids.shape
        key_mask = attention_mask
        prefill = kv_cache is None or kv_cache.seq_len == 0
        if kv_cache is not None:
            runtime_gather_output = True
            start = kv_cache.seq_len
            key_mask = self._extend_cache(kv_cache, input_ids, attention_mask)
        else:
            start = 0
        if position_ids is not None:
            expected = torch.arange(start, start + seq, device=input_ids.device).expand(batch, seq)
            if position_ids.shape != (batch, seq) or not torch.equal(position_ids.to(expected.device), expected):
                raise ValueError("position_ids must be None or 0..S-1 per row (continuing after the KV cache): "
                                 "RoPE positions follow the sequence")
        decoder_input = None
        if embed is not None and self.pre_process:
            decoder_input = embed(prefill)
            if self.config.sequence_parallel:
                # GPTModel does not scatter a decoder_input it is given (untested here: SP needs TE norms).
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        output = self.language_model(
            input_ids=input_ids,
            position_ids=None,
            attention_mask=_attention_mask(key_mask, seq),
            decoder_input=decoder_input,
            inference_context=kv_cache.context if kv_cache is not None else None,
            runtime_gather_output=runtime_gather_output,
        )
        if kv_cache is not None:
            kv_cache.context.sequence_len_offset += seq
        return self._finish(output, gathered=runtime_gather_output, labels=labels, loss_fn=loss_fn)

    @staticmethod
    def _extend_cache(kv_cache, input_ids, attention_mask) -> torch.Tensor:
        batch, seq = input_ids.shape
        if kv_cache.seq_len + seq > kv_cache.max_sequence_length:
            raise ValueError(f"{kv_cache.seq_len} cached + {seq} new tokens exceed the KV cache's "
                             f"max_sequence_length {kv_cache.max_sequence_length}")
        if batch > kv_cache.max_batch_size:
            raise ValueError(f"batch size {batch} exceeds the KV cache's max_batch_size {kv_cache.max_batch_size}")
        new_mask = (attention_mask.to(torch.bool) if attention_mask is not None
                    else torch.ones(batch, seq, dtype=torch.bool, device=input_ids.device))
        if kv_cache.seq_len == 0:
            kv_cache.attention_mask = new_mask
        else:
            if kv_cache.attention_mask.shape[0] != batch:
                raise ValueError(f"decode batch size {batch} != prefill batch size {kv_cache.attention_mask.shape[0]}")
            kv_cache.attention_mask = torch.cat([kv_cache.attention_mask, new_mask], dim=1)
        return kv_cache.attention_mask


def text_trainer_forward(model: torch.nn.Module, mb: Dict[str, torch.Tensor]):
    """``forward_fn`` for :mod:`megatron_rcpa.train.step`: ``mb["tokens"]`` [b, s] and an optional
    ``mb["attention_mask"]``. Returns vocab-parallel logits [b, s, V/TP]."""
    return model(input_ids=mb["tokens"], attention_mask=mb.get("attention_mask"))


def build_text_policy(
    hf_config: Any,
    *,
    params_dtype: Any = torch.float32,
    padded_vocab_size: Optional[int] = None,
    make_vocab_size_divisible_by: int = 128,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    perform_initialization: bool = True,
    transformer_layer_spec=None,
    config_overrides: Optional[Dict[str, Any]] = None,
    **_ignored: Any,
) -> TextLMPolicy:
    """Build this rank's stage of a Llama / Qwen2 text policy at the current megatron TP/PP layout
    (arguments as :func:`~megatron_rcpa.models.qwen2_5_vl.build_qwen2_5_vl_policy`; VLM-only keywords such as
    ``vision_attn_implementation`` are accepted and ignored)."""
    hf_config = text_lm_hf_config(hf_config)
    dims = text_lm_decoder_dims(hf_config)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if parallel_state.get_context_parallel_world_size() > 1:
        raise ValueError("context parallelism is not supported by the text LM policy")
    if padded_vocab_size is None:
        padded_vocab_size = pad_vocab_size(dims.vocab_size, make_vocab_size_divisible_by)
    if padded_vocab_size < dims.vocab_size:
        raise ValueError(f"padded_vocab_size={padded_vocab_size} < vocab_size={dims.vocab_size}")
    check_parallel_layout(dims, tp=tp, pp=pp, padded_vocab_size=padded_vocab_size)
    config = decoder_transformer_config(dims, tp=tp, pp=pp, params_dtype=parse_dtype(params_dtype),
                                        perform_initialization=perform_initialization, **(config_overrides or {}))
    policy = TextLMPolicy(
        hf_config, config, padded_vocab_size=padded_vocab_size,
        pre_process=parallel_state.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=parallel_state.is_pipeline_last_stage() if post_process is None else post_process,
        transformer_layer_spec=transformer_layer_spec,
    )
    if config.params_dtype != torch.float32:
        policy.language_model.to(dtype=config.params_dtype)
    if torch.cuda.is_available():
        policy.cuda(torch.cuda.current_device())
    return policy
