"""The decoder's norms for the local (non-TE) layer spec, with sequence parallelism.

Megatron's torch norm (``WrappedTorchNorm``, what the local spec uses without apex) asserts
``not config.sequence_parallel``. :class:`LocalNorm` computes exactly what ``torch.nn.RMSNorm`` /
``torch.nn.LayerNorm`` compute (the same ``F.rms_norm`` / ``F.layer_norm`` call, the same ``weight`` / ``bias``
names) and marks its parameters with ``sequence_parallel = config.sequence_parallel``: with sequence
parallelism each TP rank normalises only its ``s/TP`` slice of the sequence, so the norm's gradient is partial
on every rank, and megatron's ``finalize_model_grads`` all-reduces over TP exactly the gradients of the
parameters that carry that attribute (as it does for TE's norms).

:func:`local_block_spec` is the decoder's block spec on the local layer spec with :class:`LocalNorm` for the
input / pre-MLP / final norms (the final norm is chosen by the block spec, not the layer spec).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["LocalNorm", "local_block_spec"]


class LocalNorm(torch.nn.Module):
    """RMSNorm or LayerNorm (``config.normalization``) over the last dimension; megatron's norm-builder
    signature. The other megatron norm options (zero-centred gamma, persistent / memory-efficient kernels) need
    fused kernels and are refused by name."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: Optional[str] = None) -> None:
        super().__init__()
        kind = config.normalization
        if kind not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"LocalNorm: normalization={kind!r} is not supported (RMSNorm or LayerNorm)")
        for flag in ("layernorm_zero_centered_gamma", "persist_layer_norm", "memory_efficient_layer_norm"):
            if getattr(config, flag, False):
                raise ValueError(f"LocalNorm: TransformerConfig.{flag}=True needs a fused norm kernel (TE/apex); "
                                 "set it False for the local layer spec")
        self.normalization = kind
        self.hidden_size = int(hidden_size)
        self.eps = float(eps)
        dtype = config.params_dtype
        self.weight = torch.nn.Parameter(torch.ones(self.hidden_size, dtype=dtype))
        self.bias = (torch.nn.Parameter(torch.zeros(self.hidden_size, dtype=dtype)) if kind == "LayerNorm"
                     else None)
        for p in self.parameters():
            # read by finalize_model_grads: all-reduce this gradient over TP when sequence parallel is on
            p.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalization == "RMSNorm":
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalization}({self.hidden_size}, eps={self.eps})"


def local_block_spec(config, normalization: str = "RMSNorm", attention: str = "megatron"):
    """The decoder block of this pipeline stage on megatron's local layer spec, with :class:`LocalNorm` as the
    input, pre-MLP and final norm and ``attention``'s core attention (``megatron``: its unfused
    ``DotProductAttention``; ``sdpa``: :class:`~megatron_rcpa.models.attention.SDPACoreAttention`): a
    ``TransformerBlockSubmodules`` holding this stage's number of layers (megatron's ``get_num_layers_to_build``:
    uneven first/last stages included)."""
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = get_gpt_layer_local_spec(normalization=normalization)
    layer = dataclasses.replace(layer, submodules=dataclasses.replace(
        layer.submodules, input_layernorm=LocalNorm, pre_mlp_layernorm=LocalNorm))
    if attention != "megatron":
        from megatron_rcpa.models.attention import with_core_attention

        layer = with_core_attention(layer, attention)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=LocalNorm)
