"""Tiny Megatron-Core models for tests, identical in every TP/PP layout, plus layout-free views of them.

    config = tiny_transformer_config()              # inside a run_distributed worker: TP/PP taken from
    model = tiny_gpt_model(config, vocab_size=250)  # parallel_state; pre/post_process from the PP stage
    full = gather_global_tensors(model)             # {"decoder.layers.3.mlp.linear_fc1.weight": full tensor}

Megatron's own ``use_cpu_initialization`` builds each TP-sharded weight from one full "master" tensor, so it
is TP-invariant, but it draws every tensor from one RNG stream in construction order: a PP stage that does
not build the embedding and the first layers draws different numbers for the later ones. So
:func:`tiny_gpt_model` re-initialises every parameter from its *global* name (layer numbers counted over
the whole model, not the stage) with a generator seeded by (seed, name), then keeps this rank's TP shard:
the same global weights at every TP x PP x DP layout, independent of construction order.

:func:`global_param_names` maps a stage's parameter names to global ones; :func:`gather_global_tensors`
rebuilds full (unsharded) parameters or gradients under those names, for comparing layouts.
"""

from __future__ import annotations

import re
import zlib
from typing import Any, Dict, Optional

import torch

__all__ = [
    "gather_global_tensors",
    "global_param_names",
    "init_global_weights",
    "padded_vocab_size",
    "tiny_gpt_model",
    "tiny_transformer_config",
]

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")


def _parallel_sizes() -> tuple:
    """(tp, pp) from megatron's parallel_state when it is initialised, else (1, 1)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 1, 1
    return ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()


def padded_vocab_size(vocab_size: int, tp: Optional[int] = None, divisible_by: int = 128) -> int:
    """The vocabulary size megatron trains with: rounded up to a multiple of ``divisible_by * tp``.

    Same rule as megatron.training's ``_vocab_size_with_padding``. The padded rows are real (trainable)
    classes of the output softmax; they simply never occur as targets.
    """
    if tp is None:
        tp = _parallel_sizes()[0]
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def tiny_transformer_config(**overrides: Any):
    """A 4-layer, hidden-64 fp32 ``TransformerConfig`` that runs on CPU; ``overrides`` replace any field.

    TP/PP sizes come from parallel_state (1 when it is not initialised). Dropout is off and every fusion
    that needs CUDA extensions or Transformer Engine is disabled.
    """
    from megatron.core.transformer import TransformerConfig

    tp, pp = _parallel_sizes()
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
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if config is None:
        config = tiny_transformer_config()
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage() if ps.model_parallel_is_initialized() else True
    if post_process is None:
        post_process = ps.is_pipeline_last_stage() if ps.model_parallel_is_initialized() else True
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


def _unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers (they hold it as ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def global_param_names(model) -> Dict[str, str]:
    """{this stage's parameter name: its name in the whole (unpipelined) model}.

    Layer indices are rewritten to global ones (``layer_number - 1``); on a last pipeline stage that holds
    a copy of tied embeddings, ``output_layer.weight`` maps to ``embedding.word_embeddings.weight``.
    Names are those of the unwrapped model (no ``module.`` prefix).
    """
    model = _unwrap(model)
    layers = getattr(getattr(model, "decoder", None), "layers", [])
    index = {i: layer.layer_number - 1 for i, layer in enumerate(layers)}
    tied_copy = bool(getattr(model, "share_embeddings_and_output_weights", False)) and not getattr(
        model, "pre_process", True)
    names = {}
    for name, _ in model.named_parameters():
        m = _LAYER_RE.match(name)
        if m:
            global_name = f"decoder.layers.{index[int(m.group(1))]}.{name[m.end():]}"
        elif tied_copy and name == "output_layer.weight":
            global_name = "embedding.word_embeddings.weight"
        else:
            global_name = name
        names[name] = global_name
    return names


def _tp_layout(param: torch.Tensor):
    """(partition dim, stride) of a TP-sharded parameter, or (None, 1) for a replicated one.

    Megatron's rule (``_initialize_affine_weight_cpu``): the full tensor is split along the partition dim
    into ``tp * stride`` equal chunks and rank r holds chunks r, r + tp, r + 2 tp, ... in that order;
    e.g. a gated (SwiGLU) ``linear_fc1`` has stride 2: each rank holds its slice of the gate, then of up.
    """
    if not getattr(param, "tensor_model_parallel", False):
        return None, 1
    return param.partition_dim, int(getattr(param, "partition_stride", 1))


def _shard(full: torch.Tensor, dim: int, stride: int, tp: int, rank: int) -> torch.Tensor:
    chunks = full.chunk(tp * stride, dim=dim)
    return torch.cat(chunks[rank::tp], dim=dim)


def _unshard(shards, dim: int, stride: int) -> torch.Tensor:
    tp = len(shards)
    pieces = [s.chunk(stride, dim=dim) for s in shards]  # pieces[r][j] is global chunk j * tp + r
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(tp)], dim=dim)


def _is_norm_weight(module: torch.nn.Module, leaf: str) -> bool:
    return leaf == "weight" and "norm" in type(module).__name__.lower()


@torch.no_grad()
def init_global_weights(model, seed: int = 1234, std: Optional[float] = None) -> None:
    """Re-initialise every parameter from its global name, then keep this rank's TP shard.

    Each full tensor is drawn from ``N(mean, std)`` (mean 1 for norm weights, 0 otherwise; ``std``
    defaults to ``config.init_method_std``) with a generator seeded by (seed, global name): weights,
    biases and norm scales are all non-trivial, and identical at any TP/PP/DP layout.
    """
    from megatron.core import parallel_state as ps

    model = _unwrap(model)
    config = model.config
    std = config.init_method_std if std is None else std
    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    tp_rank = ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
    names = global_param_names(model)
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        global_name = names[name]
        owner, _, leaf = name.rpartition(".")
        dim, stride = _tp_layout(param)
        shape = list(param.shape)
        if dim is not None:
            shape[dim] *= tp
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(global_name.encode())) % (2**62))
        full = torch.randn(shape, generator=gen, dtype=torch.float32) * std
        if _is_norm_weight(modules[owner], leaf):
            full += 1.0
        if dim is not None:
            full = _shard(full, dim, stride, tp, tp_rank)
        param.copy_(full.to(param.dtype))


@torch.no_grad()
def gather_global_tensors(model, which: str = "param") -> Dict[str, torch.Tensor]:
    """{global name: full tensor} for this stage: parameters (``which="param"``) or their gradients
    (``"grad"``: ``main_grad`` when megatron DDP keeps one, else ``.grad``; missing grads are skipped).

    TP shards are all-gathered, so every TP rank returns full tensors; a collective over the TP group:
    call it on all ranks. Returns fp32 CPU clones.
    """
    from megatron.core import parallel_state as ps

    if which not in ("param", "grad"):
        raise ValueError(f"gather_global_tensors: which={which!r}, expected 'param' or 'grad'")
    model = _unwrap(model)
    initialized = ps.model_parallel_is_initialized()
    tp = ps.get_tensor_model_parallel_world_size() if initialized else 1
    group = ps.get_tensor_model_parallel_group() if initialized else None
    names = global_param_names(model)
    out = {}
    for name, param in model.named_parameters():
        if which == "param":
            tensor = param
        else:
            tensor = getattr(param, "main_grad", None)
            if tensor is None:
                tensor = param.grad
            if tensor is None:
                continue
        tensor = tensor.detach().float()
        dim, stride = _tp_layout(param)
        if dim is not None and tp > 1:
            shards = [torch.empty_like(tensor) for _ in range(tp)]
            torch.distributed.all_gather(shards, tensor.contiguous(), group=group)
            tensor = _unshard(shards, dim, stride)
        out[names[name]] = tensor.clone().cpu()
    return out
