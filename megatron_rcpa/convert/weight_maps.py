"""Parameter-name tables: HF checkpoint tensors <-> megatron policy parameters.

One table per model family (:mod:`megatron_rcpa.convert.families`); the Qwen2/Llama text tower is written
once (:func:`decoder_tensor_maps`) and shared. A table is a tuple of

* :class:`TensorMap` - one megatron parameter made of one or more HF tensors, with a :class:`Kind` that
  says how the full tensor is laid out on megatron's side and how it is split over tensor-parallel ranks;
  ``{layer}`` in both names stands for the *global* decoder layer index;
* :class:`ModuleMap` - a whole HF module kept as is (the vision tower): every parameter below
  ``megatron_prefix`` is the HF tensor of the same name below ``hf_prefix``, replicated over TP.

HF names are the on-disk names (``model.layers.0...``, ``visual.blocks.0...``); the family's
``hf_aliases`` map transformers-5 in-memory names (``model.language_model.``, ``model.visual.``) onto them.

The transforms (:func:`to_megatron_shard`, :func:`to_hf_tensors`) act on plain tensors:

==============  =======================================================  ============================
kind            megatron tensor (TP=1)                                    TP shard r of N
==============  =======================================================  ============================
REPLICATED      the HF tensor                                             the whole tensor
COLUMN          the HF tensor                                             rows chunk r
ROW             the HF tensor                                             columns chunk r
VOCAB           HF rows + zero rows up to the padded vocabulary           rows chunk r
QKV             per query group g: [q heads of g; k_g; v_g] (rows)        query groups chunk r
GATED_FC1       [gate; up] (rows)                                         [gate chunk r; up chunk r]
CLASS_TOKEN     the HF [H] vector as [1, 1, H]                            the whole tensor
==============  =======================================================  ============================

A TensorMap's ``layout`` names the sizes its QKV transform uses: ``"decoder"`` (the language model's
heads / KV groups) or another layout the family provides (``"vision"``: the ViT's heads, one group each).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Dict, Iterable, List, Sequence, Tuple, Union

import torch

__all__ = [
    "Kind",
    "LayerLayout",
    "ModuleMap",
    "TensorMap",
    "decoder_tensor_maps",
    "expand_tensor_maps",
    "mlp_projector_tensor_maps",
    "to_hf_tensors",
    "to_megatron_shard",
    "vit_tensor_maps",
]

LAYER = "{layer}"


class Kind(enum.Enum):
    REPLICATED = "replicated"
    COLUMN = "column"
    ROW = "row"
    VOCAB = "vocab"
    QKV = "qkv"
    GATED_FC1 = "gated_fc1"
    CLASS_TOKEN = "class_token"


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One megatron parameter <- ``hf`` tensors (in order), laid out as ``kind`` says."""

    megatron: str
    hf: Tuple[str, ...]
    kind: Kind
    export: bool = True  # False for a duplicate that is not written back to HF (a tied output layer)
    layout: str = "decoder"  # which LayerLayout the QKV transform uses

    @property
    def per_layer(self) -> bool:
        return LAYER in self.megatron

    def expand(self, layer: int) -> Tuple[str, Tuple[str, ...]]:
        return (self.megatron.replace(LAYER, str(layer)), tuple(h.replace(LAYER, str(layer)) for h in self.hf))


@dataclasses.dataclass(frozen=True)
class ModuleMap:
    """A module kept as is: megatron ``megatron_prefix + name`` <- HF ``hf_prefix + name``, replicated."""

    megatron_prefix: str
    hf_prefix: str


Entry = Union[TensorMap, ModuleMap]


@dataclasses.dataclass(frozen=True)
class LayerLayout:
    """The sizes the transforms need."""

    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int = 0
    padded_vocab_size: int = 0


def decoder_tensor_maps(*, megatron_prefix: str, hf_prefix: str, lm_head: str, qkv_bias: bool,
                        tied: bool) -> Tuple[TensorMap, ...]:
    """The Qwen2 / Llama decoder: megatron ``GPTModel`` (local spec) <- HF ``*ForCausalLM`` text tower.

    ``megatron_prefix``: where the GPTModel sits in the policy (``"language_model."``);
    ``hf_prefix``: where the text model sits in the HF checkpoint (``"model."``);
    ``lm_head``: the HF output projection's name; with ``tied`` the megatron output layer (present on the
    last stage when PP > 1) is filled from the embedding and not exported.
    """
    m, h, L = megatron_prefix, hf_prefix, LAYER
    attn, mlp = f"{h}layers.{L}.self_attn.", f"{h}layers.{L}.mlp."
    maps = [
        TensorMap(f"{m}embedding.word_embeddings.weight", (f"{h}embed_tokens.weight",), Kind.VOCAB),
        TensorMap(f"{m}decoder.layers.{L}.input_layernorm.weight", (f"{h}layers.{L}.input_layernorm.weight",),
                  Kind.REPLICATED),
        TensorMap(f"{m}decoder.layers.{L}.self_attention.linear_qkv.weight",
                  (f"{attn}q_proj.weight", f"{attn}k_proj.weight", f"{attn}v_proj.weight"), Kind.QKV),
    ]
    if qkv_bias:
        maps.append(TensorMap(f"{m}decoder.layers.{L}.self_attention.linear_qkv.bias",
                              (f"{attn}q_proj.bias", f"{attn}k_proj.bias", f"{attn}v_proj.bias"), Kind.QKV))
    maps += [
        TensorMap(f"{m}decoder.layers.{L}.self_attention.linear_proj.weight", (f"{attn}o_proj.weight",), Kind.ROW),
        TensorMap(f"{m}decoder.layers.{L}.pre_mlp_layernorm.weight",
                  (f"{h}layers.{L}.post_attention_layernorm.weight",), Kind.REPLICATED),
        TensorMap(f"{m}decoder.layers.{L}.mlp.linear_fc1.weight", (f"{mlp}gate_proj.weight", f"{mlp}up_proj.weight"),
                  Kind.GATED_FC1),
        TensorMap(f"{m}decoder.layers.{L}.mlp.linear_fc2.weight", (f"{mlp}down_proj.weight",), Kind.ROW),
        TensorMap(f"{m}decoder.final_layernorm.weight", (f"{h}norm.weight",), Kind.REPLICATED),
        TensorMap(f"{m}output_layer.weight", (f"{h}embed_tokens.weight",) if tied else (lm_head,), Kind.VOCAB,
                  export=not tied),
    ]
    return tuple(maps)


def vit_tensor_maps(*, kind: str, num_layers: int, megatron_prefix: str = "vision_model.",
                    hf_prefix: str = "vision_tower.") -> Tuple[TensorMap, ...]:
    """A CLIP / SigLIP vision tower (HF ``CLIPVisionModel`` / ``SiglipVisionModel``, transformers-5 names)
    <- megatron ``CLIPViTModel`` on the local ViT spec, its first ``num_layers`` layers (TP-sharded).

    ``kind``: ``"clip"`` (class token, pre-LayerNorm, patch convolution without bias) or ``"siglip"``.
    Layers are listed one by one (the ``{layer}`` placeholder counts decoder layers).
    """
    m, h = megatron_prefix, hf_prefix
    maps = [
        TensorMap(f"{m}conv1.weight", (f"{h}embeddings.patch_embedding.weight",), Kind.REPLICATED),
        TensorMap(f"{m}position_embeddings.weight", (f"{h}embeddings.position_embedding.weight",), Kind.REPLICATED),
    ]
    if kind == "clip":
        maps += [TensorMap(f"{m}class_token", (f"{h}embeddings.class_embedding",), Kind.CLASS_TOKEN),
                 TensorMap(f"{m}ln_pre.weight", (f"{h}pre_layrnorm.weight",), Kind.REPLICATED),
                 TensorMap(f"{m}ln_pre.bias", (f"{h}pre_layrnorm.bias",), Kind.REPLICATED)]
    elif kind == "siglip":
        maps.append(TensorMap(f"{m}conv1.bias", (f"{h}embeddings.patch_embedding.bias",), Kind.REPLICATED))
    else:
        raise ValueError(f"unknown vision tower kind {kind!r}")
    for i in range(num_layers):
        ml, hl = f"{m}decoder.layers.{i}.", f"{h}encoder.layers.{i}."
        attn = f"{hl}self_attn."
        for p in ("weight", "bias"):
            row = Kind.ROW if p == "weight" else Kind.REPLICATED  # a row-parallel bias is whole on every rank
            maps += [
                TensorMap(f"{ml}input_layernorm.{p}", (f"{hl}layer_norm1.{p}",), Kind.REPLICATED),
                TensorMap(f"{ml}self_attention.linear_qkv.{p}",
                          (f"{attn}q_proj.{p}", f"{attn}k_proj.{p}", f"{attn}v_proj.{p}"), Kind.QKV, layout="vision"),
                TensorMap(f"{ml}self_attention.linear_proj.{p}", (f"{attn}out_proj.{p}",), row),
                TensorMap(f"{ml}pre_mlp_layernorm.{p}", (f"{hl}layer_norm2.{p}",), Kind.REPLICATED),
                TensorMap(f"{ml}mlp.linear_fc1.{p}", (f"{hl}mlp.fc1.{p}",), Kind.COLUMN),
                TensorMap(f"{ml}mlp.linear_fc2.{p}", (f"{hl}mlp.fc2.{p}",), row),
            ]
    return tuple(maps)


def mlp_projector_tensor_maps(*, bias: bool, megatron_prefix: str = "vision_projection.encoder.",
                              hf_prefix: str = "multi_modal_projector.") -> Tuple[TensorMap, ...]:
    """HF ``LlavaMultiModalProjector`` (linear_1, act, linear_2) <- megatron ``MultimodalProjector`` ("mlp")."""
    m, h = megatron_prefix, hf_prefix
    maps = [TensorMap(f"{m}linear_fc1.weight", (f"{h}linear_1.weight",), Kind.COLUMN),
            TensorMap(f"{m}linear_fc2.weight", (f"{h}linear_2.weight",), Kind.ROW)]
    if bias:
        maps += [TensorMap(f"{m}linear_fc1.bias", (f"{h}linear_1.bias",), Kind.COLUMN),
                 TensorMap(f"{m}linear_fc2.bias", (f"{h}linear_2.bias",), Kind.REPLICATED)]
    return tuple(maps)


def expand_tensor_maps(entries: Iterable[Entry], num_layers: int) -> Dict[str, Tuple[TensorMap, Tuple[str, ...]]]:
    """megatron name (global layer index) -> (its TensorMap, its HF names), for every TensorMap entry."""
    out: Dict[str, Tuple[TensorMap, Tuple[str, ...]]] = {}
    for entry in entries:
        if not isinstance(entry, TensorMap):
            continue
        for layer in range(num_layers) if entry.per_layer else [None]:
            name, hf = entry.expand(layer) if layer is not None else (entry.megatron, entry.hf)
            out[name] = (entry, hf)
    return out


_LAYER_INDEX = re.compile(r"(decoder\.layers\.)(\d+)(\.)")


def globalize_layer_index(name: str, offset: int) -> str:
    """'...decoder.layers.0.x' on a stage whose first layer is global layer ``offset`` -> '...layers.{offset}.x'."""
    if not offset:
        return name
    return _LAYER_INDEX.sub(lambda mt: f"{mt.group(1)}{int(mt.group(2)) + offset}{mt.group(3)}", name, count=1)


# ------------------------------------------------------------------------------------------ transforms
def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _qkv_full(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: LayerLayout) -> torch.Tensor:
    nh, ng, hd = lay.num_attention_heads, lay.num_kv_heads, lay.head_dim
    _check(q.shape[0] == nh * hd, f"q has {q.shape[0]} rows, expected num_heads*head_dim = {nh}*{hd}")
    _check(k.shape[0] == ng * hd and v.shape[0] == ng * hd,
           f"k/v have {k.shape[0]}/{v.shape[0]} rows, expected num_kv_heads*head_dim = {ng}*{hd}")
    rest = q.shape[1:]
    q = q.reshape(ng, (nh // ng) * hd, *rest)
    k = k.reshape(ng, hd, *rest)
    v = v.reshape(ng, hd, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def to_megatron_shard(kind: Kind, hf: Sequence[torch.Tensor], *, tp_rank: int, tp_size: int,
                      layout: LayerLayout) -> torch.Tensor:
    """The megatron tensor (TP shard ``tp_rank`` of ``tp_size``) built from the HF tensors."""
    if kind is Kind.REPLICATED:
        return hf[0]
    if kind is Kind.COLUMN:
        return hf[0].chunk(tp_size, dim=0)[tp_rank]
    if kind is Kind.ROW:
        _check(hf[0].shape[1] % tp_size == 0, f"{hf[0].shape[1]} columns do not split over TP={tp_size}")
        return hf[0].chunk(tp_size, dim=1)[tp_rank]
    if kind is Kind.VOCAB:
        table = hf[0]
        _check(table.shape[0] == layout.vocab_size,
               f"{table.shape[0]} vocabulary rows, expected vocab_size={layout.vocab_size}")
        pad = layout.padded_vocab_size - table.shape[0]
        if pad:
            table = torch.cat([table, table.new_zeros((pad, *table.shape[1:]))], dim=0)
        return table.chunk(tp_size, dim=0)[tp_rank]
    if kind is Kind.QKV:
        _check(layout.num_kv_heads % tp_size == 0, f"TP={tp_size} does not divide num_kv_heads={layout.num_kv_heads}")
        return _qkv_full(*hf, layout).chunk(tp_size, dim=0)[tp_rank]
    if kind is Kind.CLASS_TOKEN:
        _check(hf[0].dim() == 1, f"a class embedding is a vector, got shape {list(hf[0].shape)}")
        return hf[0].reshape(1, 1, -1)
    if kind is Kind.GATED_FC1:
        gate, up = hf
        _check(gate.shape == up.shape, f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
        _check(gate.shape[0] % tp_size == 0, f"{gate.shape[0]} rows do not split over TP={tp_size}")
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    raise AssertionError(kind)


def _cat(shards: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat`` of the TP shards; one shard is returned as is (no copy of a whole vocabulary table)."""
    return shards[0] if len(shards) == 1 else torch.cat(list(shards), dim=dim)


def to_hf_tensors(kind: Kind, shards: Sequence[torch.Tensor], *, layout: LayerLayout) -> List[torch.Tensor]:
    """The HF tensors (in the TensorMap's order) from the megatron TP shards (rank order); with one shard they
    may be views of it."""
    if kind is Kind.REPLICATED:
        return [shards[0]]
    if kind is Kind.COLUMN:
        return [_cat(shards, 0)]
    if kind is Kind.ROW:
        return [_cat(shards, 1)]
    if kind is Kind.VOCAB:
        return [_cat(shards, 0)[: layout.vocab_size]]
    if kind is Kind.QKV:
        nh, ng, hd = layout.num_attention_heads, layout.num_kv_heads, layout.head_dim
        full = _cat(shards, 0)
        rest = full.shape[1:]
        grouped = full.reshape(ng, (nh // ng + 2) * hd, *rest)
        q_rows = (nh // ng) * hd
        return [grouped[:, :q_rows].reshape(nh * hd, *rest),
                grouped[:, q_rows:q_rows + hd].reshape(ng * hd, *rest),
                grouped[:, q_rows + hd:].reshape(ng * hd, *rest)]
    if kind is Kind.CLASS_TOKEN:
        return [shards[0].reshape(-1)]
    if kind is Kind.GATED_FC1:
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)]
    raise AssertionError(kind)
