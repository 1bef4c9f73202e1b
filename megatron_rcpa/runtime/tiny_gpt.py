"""A tiny Megatron-Core GPT, identical in every TP/PP layout: the profiler's ``model.family=gpt`` and tests.

    config = tiny_transformer_config()              # TP/PP sizes from the current parallel groups
    model = tiny_gpt_model(config, vocab_size=250)  # pre/post_process from this rank's pipeline stage

The weights are re-initialised per global parameter name (:func:`megatron_rcpa.runtime.weights.init_global_weights`),
so every layout holds the same model. Everything that needs CUDA extensions or Transformer Engine is off, and
the local (non-TE) layer spec is used, so it runs on a CPU (with the device shim) as well as on a GPU.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from megatron_rcpa.runtime.parallel import ParallelGroups
from megatron_rcpa.runtime.weights import init_global_weights, padded_vocab_size

__all__ = ["tiny_gpt_model", "tiny_transformer_config"]


def tiny_transformer_config(**overrides: Any):
    """A 4-layer, hidden-64 fp32 ``TransformerConfig`` that runs on CPU; ``overrides`` replace any field.

    TP/PP sizes come from parallel_state (1 when it is not initialised). Dropout is off and every fusion
    that needs CUDA extensions or Transformer Engine is disabled.
    """
    from megatron.core.transformer import TransformerConfig

    groups = ParallelGroups.current()
    tp, pp = (groups.tp_size, groups.pp_size) if groups is not None else (1, 1)
    fields: Dict[str, Any] = dict(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        bf16=False,
        fp16=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=False,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        init_method_std=0.02,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def tiny_gpt_model(
    config=None,
    vocab_size: int = 250,
    max_seq: int = 64,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    *,
    make_vocab_size_divisible_by: int = 128,
    position_embedding_type: str = "rope",
    init_seed: Optional[int] = 1234,
    layer_spec=None,
    **kw: Any,
):
    """A ``GPTModel`` with megatron's local (non-TE) layer spec, for this rank's TP/PP position.

    ``vocab_size`` is the true vocabulary; the model is built with :func:`padded_vocab_size` of it.
    ``pre_process``/``post_process`` default to "this is the first/last pipeline stage". With
    ``init_seed`` set (the default) the weights are re-initialised layout-invariantly by
    :func:`init_global_weights`; ``init_seed=None`` keeps megatron's own initialisation. ``kw`` goes to
    ``GPTModel`` (e.g. ``share_embeddings_and_output_weights=True``).
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if config is None:
        config = tiny_transformer_config()
    groups = ParallelGroups.current()
    if pre_process is None:
        pre_process = groups.is_first_stage if groups is not None else True
    if post_process is None:
        post_process = groups.is_last_stage if groups is not None else True
    if layer_spec is None:
        layer_spec = get_gpt_layer_local_spec(normalization=config.normalization,
                                              qk_layernorm=config.qk_layernorm)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=padded_vocab_size(vocab_size, config.tensor_model_parallel_size,
                                     make_vocab_size_divisible_by),
        max_sequence_length=max_seq,
        pre_process=pre_process,
        post_process=post_process,
        position_embedding_type=position_embedding_type,
        **kw,
    )
    if init_seed is not None:
        init_global_weights(model, seed=init_seed)
    return model
