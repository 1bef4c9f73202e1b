"""Moved to :mod:`megatron_rcpa.runtime.weights` and :mod:`megatron_rcpa.runtime.tiny_gpt` (the trainer and the
profiler use them); re-exported here for tests."""

from megatron_rcpa.runtime.tiny_gpt import tiny_gpt_model, tiny_transformer_config
from megatron_rcpa.runtime.weights import (
    gather_global_tensors,
    global_param_names,
    init_global_weights,
    padded_vocab_size,
)

__all__ = [
    "gather_global_tensors",
    "global_param_names",
    "init_global_weights",
    "padded_vocab_size",
    "tiny_gpt_model",
    "tiny_transformer_config",
]
