"""Deterministic per-name initialisation: the same weights at every TP x PP x DP layout, and layout-free views.

    init_global_weights(policy.language_model, seed=1234)     # megatron modules, TP-sharded
    init_replicated_by_name(hf_vision_tower, 1234, std=0.02)  # replicated (non-TP) modules
    full = gather_global_tensors(model)             # {"decoder.layers.3.mlp.linear_fc1.weight": full tensor}

Megatron's own ``use_cpu_initialization`` builds each TP-sharded weight from one full "master" tensor, so it
is TP-invariant, but it draws every tensor from one RNG stream in construction order: a PP stage that does
not build the embedding and the first layers draws different numbers for the later ones. So
:func:`init_global_weights` re-initialises every parameter from its *global* name (layer numbers counted over
the whole model, not the stage) with a generator seeded by (seed, name), then keeps this rank's TP shard:
the same global weights at every TP x PP x DP layout, independent of construction order. The trainer's tiny
models (``model.tiny``) and :mod:`megatron_rcpa.runtime.tiny_gpt` start from these weights.

TP ranks and groups come from ``groups`` (a :class:`megatron_rcpa.runtime.parallel.ParallelGroups`), by default
the current one (TP 1 when megatron's parallel state is not initialised).

:func:`global_param_names` maps a stage's parameter names to global ones; :func:`gather_global_tensors`
rebuilds full (unsharded) parameters or gradients under those names, for comparing layouts.
"""

from __future__ import annotations

import re
import zlib
from typing import Dict, Optional

import torch

__all__ = [
    "gather_global_tensors",
    "global_param_names",
    "init_global_weights",
    "init_replicated_by_name",
    "padded_vocab_size",
]

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")


def _tp_of(groups=None):
    """(tp size, tp rank, tp group) of ``groups``, else of the current parallel state, else (1, 0, None)."""
    from megatron_rcpa.runtime.parallel import ParallelGroups

    groups = groups if groups is not None else ParallelGroups.current()
    if groups is None:
        return 1, 0, None
    return groups.tp_size, groups.tp_rank, groups.tp_group


def padded_vocab_size(vocab_size: int, tp: Optional[int] = None, divisible_by: int = 128) -> int:
    """The vocabulary size megatron trains with: rounded up to a multiple of ``divisible_by * tp``.

    Same rule as megatron.training's ``_vocab_size_with_padding``. The padded rows are real (trainable)
    classes of the output softmax; they simply never occur as targets. ``tp`` defaults to the current TP size.
    """
    if tp is None:
        tp = _tp_of()[0]
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


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
def init_global_weights(model, seed: int = 1234, std: Optional[float] = None, *, groups=None) -> None:
    """Re-initialise every parameter from its global name, then keep this rank's TP shard.

    Each full tensor is drawn from ``N(mean, std)`` (mean 1 for norm weights, 0 otherwise; ``std``
    defaults to ``config.init_method_std``) with a generator seeded by (seed, global name): weights,
    biases and norm scales are all non-trivial, and identical at any TP/PP/DP layout.
    """
    model = _unwrap(model)
    config = model.config
    std = config.init_method_std if std is None else std
    tp, tp_rank, _ = _tp_of(groups)
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
def init_replicated_by_name(module: torch.nn.Module, seed: int, std: float) -> None:
    """Replicated (non-TP) modules such as the HF vision tower: N(0, std) per tensor (norm scales 1 + that),
    from a generator seeded by (seed, parameter name): identical on every rank and layout."""
    for name, p in module.named_parameters():
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62))
        full = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
        if "norm" in name and name.endswith("weight"):
            full += 1.0
        p.copy_(full.to(device=p.device, dtype=p.dtype))


@torch.no_grad()
def gather_global_tensors(model, which: str = "param", *, groups=None) -> Dict[str, torch.Tensor]:
    """{global name: full tensor} for this stage: parameters (``which="param"``) or their gradients
    (``"grad"``: ``main_grad`` when megatron DDP keeps one, else ``.grad``; missing grads are skipped).

    TP shards are all-gathered, so every TP rank returns full tensors; a collective over the TP group:
    call it on all ranks. Returns fp32 CPU clones.
    """
    if which not in ("param", "grad"):
        raise ValueError(f"gather_global_tensors: which={which!r}, expected 'param' or 'grad'")
    model = _unwrap(model)
    tp, _, group = _tp_of(groups)
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
