"""HF <-> Megatron conversion: weight maps (the parameter-name tables), checkpoint I/O, converters, parity gate.

* :mod:`.weight_maps` - :class:`TensorMap` / :class:`ModuleMap` tables and the TP-aware transforms;
  :func:`decoder_tensor_maps` is the Qwen2/Llama text tower, shared by every family
* :mod:`.families` - the model-family registry's lookups for the converters (ConversionError)
* :mod:`.checkpoint` - dist_checkpointing save/load + metadata (reused by the trainer)
* :mod:`.hf_to_megatron`, :mod:`.megatron_to_hf`, :mod:`.verify` - what ``tools/`` run
* :mod:`.streaming` - conversion without building the model (meta-device policy, tensors made when written,
  checkpoints loaded a decoder layer at a time)
* :mod:`.hf_io` - safetensors reading/writing, tokenizer/processor files

Names are resolved lazily (no megatron import until used).
"""

import importlib

_EXPORTS = {
    "ConversionError": "errors",
    "CheckpointMetadata": "checkpoint",
    "build_policy_from_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "read_metadata": "checkpoint",
    "save_checkpoint": "checkpoint",
    "convert_hf_to_megatron": "hf_to_megatron",
    "load_hf_weights": "hf_to_megatron",
    "plan_hf_to_megatron": "hf_to_megatron",
    "convert_megatron_to_hf": "megatron_to_hf",
    "export_hf_tensors": "megatron_to_hf",
    "verify_conversion": "verify",
    "family_by_name": "families",
    "family_for_config": "families",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
