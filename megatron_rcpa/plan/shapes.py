"""The sizes of a policy that its memory depends on, read from an HF config (no megatron import).

:class:`ModelShape` holds the decoder's sizes (:class:`~megatron_rcpa.models.decoder.DecoderDims`, the
family's own reader), the padded vocabulary and the vision side: :class:`VisionShape` for Qwen2.5-VL's HF
tower (replicated over TP; its parameters are counted exactly by instantiating the transformers module on
the meta device) and for LLaVA's megatron ViT + projector (TP-sharded; counted from the module definitions
in :mod:`megatron_rcpa.models.llava`), or none for text LMs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional

from megatron_rcpa.models.decoder import DecoderDims, pad_vocab_size

__all__ = ["ModelShape", "VisionShape", "load_hf_config_json", "model_shape"]

#: make_vocab_size_divisible_by of every family's builder (the vocabulary is padded to a multiple of it)
VOCAB_DIVISOR = 128


@dataclasses.dataclass(frozen=True)
class VisionShape:
    """The vision side of a VLM, as far as memory goes."""

    kind: str  # "qwen2_5_vl" (HF tower, replicated over TP) | "llava" (megatron ViT + projector, TP-sharded)
    depth: int  # transformer blocks that run
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    head_dim: int
    patch_size: int
    patch_dim: int  # input features per patch (C * T * P * P for Qwen2.5-VL, C * P * P for LLaVA)
    spatial_merge_size: int = 1  # patches per image token = spatial_merge_size ** 2 (Qwen2.5-VL)
    out_hidden_size: int = 0
    # parameters on one TP rank of the first stage: trained (replicated / TP-sharded parts), frozen buffers
    params_replicated: int = 0
    params_tp_sharded: int = 0  # numel over ALL TP ranks (divided by TP per rank)
    frozen_numel: int = 0  # LLaVA's unused HF tower tensors kept as buffers (no grads, no optimizer)
    tokens_per_image: int = 0  # LLaVA: fixed; Qwen2.5-VL: from the image size
    class_token_len: int = 0
    seq_length: int = 0  # LLaVA: positions the ViT runs per image (patches + class token)

    def params_per_rank(self, tp: int) -> int:
        return self.params_replicated + self.params_tp_sharded // tp

    @property
    def total_params(self) -> int:
        return self.params_replicated + self.params_tp_sharded


@dataclasses.dataclass(frozen=True)
class ModelShape:
    family: str
    dims: DecoderDims
    padded_vocab_size: int
    vision: Optional[VisionShape]
    mrope: bool  # position ids per row (Qwen2.5-VL) rather than one set for the batch

    @property
    def tied(self) -> bool:
        return self.dims.tie_word_embeddings


def load_hf_config_json(path: str) -> Dict[str, Any]:
    """An HF ``config.json`` (a file, or a directory holding one) as a dict."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--hf-config {path!r}: no such file (expected an HF config.json)")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except ValueError as exc:
            raise ValueError(f"--hf-config {path!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"--hf-config {path!r}: expected a JSON object")
    return data


def _qwen_vision(hf_config) -> VisionShape:
    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    vc = hf_config.vision_config
    with torch.device("meta"):
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(vc)
    numel = sum(p.numel() for p in tower.parameters())
    hidden, heads = int(vc.hidden_size), int(vc.num_heads)
    patch, temporal = int(vc.patch_size), int(vc.temporal_patch_size)
    return VisionShape(kind="qwen2_5_vl", depth=int(vc.depth), hidden_size=hidden,
                       ffn_hidden_size=int(vc.intermediate_size), num_heads=heads, head_dim=hidden // heads,
                       patch_size=patch, patch_dim=int(vc.in_channels) * temporal * patch * patch,
                       spatial_merge_size=int(vc.spatial_merge_size), out_hidden_size=int(vc.out_hidden_size),
                       params_replicated=numel)


def _llava_vision(hf_config) -> VisionShape:
    """megatron's CLIPViTModel (local ViT spec) + MultimodalProjector, as models/llava.py builds them."""
    from megatron_rcpa.models.llava import llava_unused_vision_tensors, llava_vision_dims

    vd = llava_vision_dims(hf_config)
    hv, fv, p, h = vd.hidden_size, vd.ffn_hidden_size, vd.patch_size, vd.text_hidden_size
    # per ViT layer: column-parallel qkv / fc1 (weights and biases sharded), row-parallel proj / fc2 (weights
    # sharded, biases full), two LayerNorms (weight + bias, full)
    sharded_layer = 3 * hv * hv + 3 * hv + hv * hv + fv * hv + fv + hv * fv
    full_layer = hv + hv + 2 * (2 * hv)
    seq = vd.num_patches + vd.class_token_len
    full = (3 * hv * p * p + (hv if vd.kind == "siglip" else 0)  # conv1 (bias only for SigLIP)
            + seq * hv + vd.class_token_len * hv  # position embeddings, class token
            + (2 * hv if vd.kind == "clip" else 0)  # ln_pre
            + vd.num_layers_used * full_layer)
    sharded = vd.num_layers_used * sharded_layer
    # projector: fc1 column-parallel (hv -> h), fc2 row-parallel (h -> h); biases as the linears say
    b = 1 if vd.projector_bias else 0
    sharded += hv * h + b * h + h * h
    full += b * h
    frozen = 0
    for shape in llava_unused_vision_tensors(hf_config).values():
        n = 1
        for s in shape:
            n *= int(s)
        frozen += n
    return VisionShape(kind="llava", depth=vd.num_layers_used, hidden_size=hv, ffn_hidden_size=fv,
                       num_heads=vd.num_attention_heads, head_dim=vd.head_dim, patch_size=p, patch_dim=3 * p * p,
                       out_hidden_size=h, params_replicated=full, params_tp_sharded=sharded, frozen_numel=frozen,
                       tokens_per_image=vd.tokens_per_image, class_token_len=vd.class_token_len,
                       seq_length=seq)


def model_shape(family: str, hf_config: Any, padded_vocab_size: Optional[int] = None) -> ModelShape:
    """The shape of ``family``'s policy for an HF config (object or ``config.json`` dict).
    ``padded_vocab_size`` defaults to what the builders use (vocabulary rounded up to 128)."""
    from megatron_rcpa.convert.families import family_by_name

    fam = family_by_name(family)
    config = fam.hf_config(hf_config)
    dims = fam.decoder_dims(config)
    padded = int(padded_vocab_size) if padded_vocab_size else pad_vocab_size(dims.vocab_size, VOCAB_DIVISOR)
    vision = None
    if family == "qwen2_5_vl":
        vision = _qwen_vision(config)
    elif family == "llava":
        vision = _llava_vision(config)
    return ModelShape(family=family, dims=dims, padded_vocab_size=padded, vision=vision,
                      mrope=family == "qwen2_5_vl")
