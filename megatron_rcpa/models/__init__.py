"""Megatron-Core VLM policies built from HF configs at any TP/PP.

* :mod:`.qwen2_5_vl` - :func:`build_qwen2_5_vl_policy`, :class:`Qwen2_5_VLPolicy`, :func:`allreduce_vision_grads`
* :mod:`.text_lm` - :func:`build_text_policy`, :class:`TextLMPolicy` (Llama / Qwen2 text LMs)
* :mod:`.llava` - :func:`build_llava_policy`, :class:`LlavaPolicy` (CLIP / SigLIP + Llama / Qwen2)
* :mod:`.mrope` - 3-D position ids as transformers computes them (plain torch, no megatron import)
* :mod:`.decoder` - the shared Qwen2/Llama decoder -> megatron ``TransformerConfig``
* :mod:`.inference` - :class:`KVCache`, :func:`greedy_generate`, :func:`gather_vocab_logits`
* :mod:`.pipeline` - :func:`pipeline_forward` (forward-only through the PP schedule)
* :mod:`.tiny` - tiny random HF checkpoints for tests and demos
* :mod:`.policy_base` - :class:`DecoderPolicy` (the one forward), :func:`build_decoder_policy`,
  :func:`trainer_forward`, :func:`causal_padding_mask`
* :mod:`.fp8` - ``model.fp8``: :func:`~.fp8.enable_torchao_fp8` (the decoder's TP linears' GEMMs in float8 through
  torchao), Transformer Engine's spec/options, :func:`~.fp8.resolve_fp8` (backend, recipe, the GPU check)
* :mod:`.families` - the model-family registry (:func:`~.families.get`, :func:`~.families.names`): one record
  per family with its builder, converter table, prompt format and tiny model

Names are resolved lazily, so importing this package (or :mod:`.mrope`) does not import megatron.
"""

import importlib

_EXPORTS = {
    "Qwen2_5_VLPolicy": "qwen2_5_vl",
    "build_qwen2_5_vl_policy": "qwen2_5_vl",
    "allreduce_vision_grads": "qwen2_5_vl",
    "PADDED_VOCAB_LOGIT": "policy_base",
    "trainer_forward": "policy_base",
    "build_decoder_policy": "policy_base",
    "causal_padding_mask": "policy_base",
    "TextLMPolicy": "text_lm",
    "build_text_policy": "text_lm",
    "LlavaPolicy": "llava",
    "build_llava_policy": "llava",
    "save_tiny_llava": "tiny",
    "tiny_llava_config": "tiny",
    "save_tiny_text_lm": "tiny",
    "tiny_text_lm_config": "tiny",
    "mrope_position_ids": "mrope",
    "next_positions": "mrope",
    "DecoderDims": "decoder",
    "decoder_transformer_config": "decoder",
    "KVCache": "inference",
    "greedy_generate": "inference",
    "gather_vocab_logits": "inference",
    "pipeline_forward": "pipeline",
    "save_tiny_qwen2_5_vl": "tiny",
    "tiny_qwen2_5_vl_config": "tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
