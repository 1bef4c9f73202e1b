"""Model families the converters know: HF architecture -> parameter-name table, policy builder, aliases.

Families: ``qwen2_5_vl``, ``llava`` (CLIP / SigLIP + Llama / Qwen2), ``llama``, ``qwen2``. Adding one is one
:class:`ModelFamily` here: its table reuses :func:`~megatron_rcpa.convert.weight_maps.decoder_tensor_maps`
for the text tower, plus the family's own entries (vision tower, projector), and a policy builder in
:mod:`megatron_rcpa.models`.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from megatron_rcpa.convert.errors import ConversionError
from megatron_rcpa.convert.hf_io import normalize_name
from megatron_rcpa.convert.weight_maps import (
    Entry,
    LayerLayout,
    ModuleMap,
    decoder_tensor_maps,
    mlp_projector_tensor_maps,
    vit_tensor_maps,
)

__all__ = ["FAMILIES", "ModelFamily", "family_by_name", "family_for_config"]


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """Everything the converters need to know about one HF architecture family."""

    name: str
    architectures: Tuple[str, ...]
    #: (transformers-5 in-memory prefix, on-disk prefix): in-memory names read from a file are mapped onto
    #: on-disk names; the converters write on-disk names.
    hf_aliases: Tuple[Tuple[str, str], ...]
    #: HF tensors dropped silently when present (non-persistent buffers some exporters save).
    ignore_hf: Tuple[str, ...]
    #: HF config -> the parameter-name table.
    table: Callable[[Any], Tuple[Entry, ...]]
    #: HF config -> the decoder's sizes (DecoderDims).
    decoder_dims: Callable[[Any], Any]
    #: "module:function" building this rank's policy stage: fn(hf_config, **kwargs).
    policy_builder: str
    #: HF config object (or dict) -> the family's HF config object.
    hf_config: Callable[[Any], Any]
    #: The HF output head's on-disk name: absent from (or ignored in) checkpoints of tied models.
    tied_head: str = "lm_head.weight"
    #: HF config -> extra LayerLayouts by name (TensorMap.layout), besides "decoder".
    extra_layouts: Optional[Callable[[Any], Dict[str, LayerLayout]]] = None
    #: (HF config, TP) -> raise ValueError naming a size of the family's own modules TP does not divide.
    check_tp: Optional[Callable[[Any, int], None]] = None

    def build_policy(self, hf_config: Any, **kwargs: Any):
        module, _, fn = self.policy_builder.partition(":")
        return getattr(importlib.import_module(module), fn)(self.hf_config(hf_config), **kwargs)

    def layout(self, hf_config: Any, padded_vocab_size: int) -> LayerLayout:
        dims = self.decoder_dims(hf_config)
        return LayerLayout(num_attention_heads=dims.num_attention_heads, num_kv_heads=dims.num_kv_heads,
                           head_dim=dims.head_dim, vocab_size=dims.vocab_size, padded_vocab_size=padded_vocab_size)

    def layouts(self, hf_config: Any, padded_vocab_size: int) -> Dict[str, LayerLayout]:
        """Every layout the family's TensorMaps name: ``"decoder"`` plus the family's own."""
        out = {"decoder": self.layout(hf_config, padded_vocab_size)}
        if self.extra_layouts is not None:
            out.update(self.extra_layouts(self.hf_config(hf_config)))
        return out

    def is_ignored(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.ignore_hf)

    def expected_hf_tensors(self, hf_config: Any) -> Dict[str, Tuple[int, ...]]:
        """On-disk name -> shape of every tensor an HF checkpoint of this config holds (from transformers'
        own module definition, instantiated on the meta device). A tied output head is not listed."""
        import transformers

        config = self.hf_config(hf_config)
        arch = next((a for a in getattr(config, "architectures", None) or [] if a in self.architectures),
                    self.architectures[0])
        cls = getattr(transformers, arch)
        with torch.device("meta"):
            model = cls(config)
        tied = bool(self.decoder_dims(config).tie_word_embeddings)
        out = {}
        for name, tensor in model.state_dict().items():
            name = normalize_name(name, self.hf_aliases)
            if tied and name == self.tied_head:
                continue
            if not self.is_ignored(name):
                out[name] = tuple(tensor.shape)
        return out


# ------------------------------------------------------------------------------------------ Qwen2.5-VL
def _qwen2_5_vl_config(hf_config: Any):
    from megatron_rcpa.convert.hf_io import load_hf_config

    if isinstance(hf_config, dict):
        hf_config = load_hf_config(hf_config)
    if getattr(hf_config, "model_type", None) != "qwen2_5_vl":
        model_type = getattr(hf_config, "model_type", None)
        raise ConversionError(f"expected a qwen2_5_vl config, got model_type={model_type!r}")
    return hf_config


def _qwen2_5_vl_dims(hf_config: Any):
    from megatron_rcpa.models.qwen2_5_vl_config import qwen2_5_vl_decoder_dims

    return qwen2_5_vl_decoder_dims(_qwen2_5_vl_config(hf_config))


def _qwen2_5_vl_table(hf_config: Any) -> Tuple[Entry, ...]:
    dims = _qwen2_5_vl_dims(hf_config)
    decoder = decoder_tensor_maps(megatron_prefix="language_model.", hf_prefix="model.", lm_head="lm_head.weight",
                                  qkv_bias=True, tied=dims.tie_word_embeddings)
    return decoder + (ModuleMap(megatron_prefix="vision_model.", hf_prefix="visual."),)


QWEN2_5_VL = ModelFamily(
    name="qwen2_5_vl",
    architectures=("Qwen2_5_VLForConditionalGeneration",),
    hf_aliases=(("model.language_model.", "model."), ("model.visual.", "visual.")),
    ignore_hf=(r"\.rotary_emb\.inv_freq$",),
    table=_qwen2_5_vl_table,
    decoder_dims=_qwen2_5_vl_dims,
    policy_builder="megatron_rcpa.models.qwen2_5_vl:build_qwen2_5_vl_policy",
    hf_config=_qwen2_5_vl_config,
)

FAMILIES: Dict[str, ModelFamily] = {QWEN2_5_VL.name: QWEN2_5_VL}


# ------------------------------------------------------------------------------ Llama / Qwen2 text LMs
def _text_family_functions(model_type: str):
    """(hf_config, decoder_dims, table) of the plain text family ``model_type`` ('llama' | 'qwen2')."""

    def hf_config(config: Any):
        from megatron_rcpa.models.text_lm import text_lm_hf_config

        if isinstance(config, dict) and config.get("model_type") == model_type:
            try:
                return text_lm_hf_config(config, model_type)
            except ValueError as exc:
                raise ConversionError(str(exc)) from exc
        if isinstance(config, dict):
            from megatron_rcpa.convert.hf_io import load_hf_config

            config = load_hf_config(config)
        if getattr(config, "model_type", None) != model_type:
            raise ConversionError(f"expected a {model_type} config, got model_type="
                                  f"{getattr(config, 'model_type', None)!r}")
        return config

    def dims(config: Any):
        from megatron_rcpa.models.text_lm import text_lm_decoder_dims

        return text_lm_decoder_dims(hf_config(config))

    def table(config: Any) -> Tuple[Entry, ...]:
        d = dims(config)
        return decoder_tensor_maps(megatron_prefix="language_model.", hf_prefix="model.", lm_head="lm_head.weight",
                                   qkv_bias=d.qkv_bias, tied=d.tie_word_embeddings)

    return hf_config, dims, table


def _text_family(name: str, architecture: str) -> ModelFamily:
    hf_config, dims, table = _text_family_functions(name)
    return ModelFamily(
        name=name,
        architectures=(architecture,),
        hf_aliases=(),
        ignore_hf=(r"\.rotary_emb\.inv_freq$",),
        table=table,
        decoder_dims=dims,
        policy_builder="megatron_rcpa.models.text_lm:build_text_policy",
        hf_config=hf_config,
    )


LLAMA = _text_family("llama", "LlamaForCausalLM")
QWEN2 = _text_family("qwen2", "Qwen2ForCausalLM")
FAMILIES[LLAMA.name] = LLAMA
FAMILIES[QWEN2.name] = QWEN2


# ---------------------------------------------------------------------------------------------- LLaVA
def _llava_call(fn_name: str, config: Any):
    """models.llava.<fn_name>(config), its ValueError turned into a ConversionError."""
    from megatron_rcpa.models import llava

    if isinstance(config, dict) and config.get("model_type") != "llava":
        raise ConversionError(f"expected a llava config, got model_type={config.get('model_type')!r}")
    try:
        return getattr(llava, fn_name)(config)
    except ValueError as exc:
        raise ConversionError(str(exc)) from exc


def _llava_table(hf_config: Any) -> Tuple[Entry, ...]:
    dims = _llava_call("llava_decoder_dims", hf_config)
    vd = _llava_call("llava_vision_dims", hf_config)
    decoder = decoder_tensor_maps(megatron_prefix="language_model.", hf_prefix="language_model.model.",
                                  lm_head="language_model.lm_head.weight", qkv_bias=dims.qkv_bias,
                                  tied=dims.tie_word_embeddings)
    return (decoder + vit_tensor_maps(kind=vd.kind, num_layers=vd.num_layers_used)
            + mlp_projector_tensor_maps(bias=vd.projector_bias)
            # the tower's tensors LLaVA never reads, kept as frozen buffers for a lossless round trip
            + (ModuleMap(megatron_prefix="vision_unused.", hf_prefix="vision_tower."),))


def _llava_check_tp(hf_config: Any, tp: int) -> None:
    from megatron_rcpa.models.llava import check_vision_layout

    check_vision_layout(_llava_call("llava_vision_dims", hf_config), tp=tp)


def _llava_layouts(hf_config: Any) -> Dict[str, LayerLayout]:
    vd = _llava_call("llava_vision_dims", hf_config)
    return {"vision": LayerLayout(num_attention_heads=vd.num_attention_heads, num_kv_heads=vd.num_attention_heads,
                                  head_dim=vd.head_dim)}


LLAVA = ModelFamily(
    name="llava",
    architectures=("LlavaForConditionalGeneration",),
    # transformers-5 in-memory names, and transformers-4 files (CLIP/SigLIP towers under ".vision_model.")
    hf_aliases=(("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                ("vision_tower.vision_model.", "vision_tower.")),
    ignore_hf=(r"\.rotary_emb\.inv_freq$", r"\.position_ids$"),
    table=_llava_table,
    decoder_dims=lambda config: _llava_call("llava_decoder_dims", config),
    policy_builder="megatron_rcpa.models.llava:build_llava_policy",
    hf_config=lambda config: _llava_call("llava_hf_config", config),
    tied_head="language_model.lm_head.weight",
    extra_layouts=_llava_layouts,
    check_tp=_llava_check_tp,
)
FAMILIES[LLAVA.name] = LLAVA


def family_by_name(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConversionError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}") from None


def family_for_config(config: Dict[str, Any]) -> ModelFamily:
    """The family of an HF ``config.json`` dict, from its ``architectures`` (else its ``model_type``)."""
    archs = config.get("architectures") or []
    for family in FAMILIES.values():
        if any(a in family.architectures for a in archs):
            return family
    if not archs:
        for family in FAMILIES.values():
            if config.get("model_type") == family.name:
                return family
    supported = sorted(a for f in FAMILIES.values() for a in f.architectures)
    raise ConversionError(f"unknown architecture {archs or None} (model_type={config.get('model_type')!r}) in "
                          f"config.json; supported: {supported}")
