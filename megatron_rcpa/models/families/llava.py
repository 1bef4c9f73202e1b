"""The ``llava`` family: HF ``LlavaForConditionalGeneration`` (CLIP / SigLIP + Llama / Qwen2) ->
:mod:`megatron_rcpa.models.llava`.

Prompt: the checkpoint's chat template (the tiny demo's character tokenizer has a ChatML one), else LLaVA-1.5's
``USER: <image>*n\\n{prompt} ASSISTANT:``; each ``<image>`` expanded to ``tokens_per_image`` tokens and the text
tokenized with the tokenizer's special tokens (BOS) as ``LlavaProcessor`` does; images ``[3, S, S]`` as the HF
processor makes them (the checkpoint's ``preprocessor_config.json``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from megatron_rcpa.convert.errors import ConversionError
from megatron_rcpa.convert.weight_maps import (
    Entry,
    LayerLayout,
    ModuleMap,
    decoder_tensor_maps,
    mlp_projector_tensor_maps,
    vit_tensor_maps,
)
from megatron_rcpa.models.families import Family, PromptFormat, register


def _llava_call(fn_name: str, config: Any):
    """models.llava.<fn_name>(config), its ValueError turned into a ConversionError."""
    from megatron_rcpa.models import llava

    if isinstance(config, dict) and config.get("model_type") != "llava":
        raise ConversionError(f"expected a llava config, got model_type={config.get('model_type')!r}")
    try:
        return getattr(llava, fn_name)(config)
    except ValueError as exc:
        raise ConversionError(str(exc)) from exc


def _table(hf_config: Any) -> Tuple[Entry, ...]:
    dims = _llava_call("llava_decoder_dims", hf_config)
    vd = _llava_call("llava_vision_dims", hf_config)
    decoder = decoder_tensor_maps(megatron_prefix="language_model.", hf_prefix="language_model.model.",
                                  lm_head="language_model.lm_head.weight", qkv_bias=dims.qkv_bias,
                                  tied=dims.tie_word_embeddings)
    return (decoder + vit_tensor_maps(kind=vd.kind, num_layers=vd.num_layers_used)
            + mlp_projector_tensor_maps(bias=vd.projector_bias)
            # the tower's tensors LLaVA never reads, kept as frozen buffers for a lossless round trip
            + (ModuleMap(megatron_prefix="vision_unused.", hf_prefix="vision_tower."),))


def _check_tp(hf_config: Any, tp: int) -> None:
    from megatron_rcpa.models.llava import check_vision_layout

    check_vision_layout(_llava_call("llava_vision_dims", hf_config), tp=tp)


def _layouts(hf_config: Any) -> Dict[str, LayerLayout]:
    vd = _llava_call("llava_vision_dims", hf_config)
    return {"vision": LayerLayout(num_attention_heads=vd.num_attention_heads, num_kv_heads=vd.num_attention_heads,
                                  head_dim=vd.head_dim)}


def _processor_settings(checkpoint: Optional[str]) -> Dict[str, Any]:
    """The checkpoint's ``preprocessor_config.json`` (empty without one)."""
    if not checkpoint:
        return {}
    from megatron_rcpa.convert.checkpoint import ASSETS_DIR

    path = os.path.join(checkpoint, ASSETS_DIR, "preprocessor_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


class LlavaPrompt(PromptFormat):
    """The chat template's prompt (else LLaVA-1.5's ``USER: <image>*n\\n{prompt} ASSISTANT:``) with BOS as the
    processor adds it, the images as the HF processor makes them (``[3, S, S]``, normalised with the
    checkpoint's processor settings)."""

    family = "llava"
    IMAGE_TOKEN = "<image>"

    def __init__(self, tokenizer, hf_config, **kwargs: Any) -> None:
        from megatron_rcpa.models.llava import llava_vision_dims

        super().__init__(tokenizer, hf_config, **kwargs)
        self.vision = llava_vision_dims(hf_config)
        self.image_token_id = int(hf_config.image_token_id)
        self.settings = _processor_settings(self.checkpoint)
        self._no_template_note("LLaVA-1.5: USER: <image>\\n{prompt} ASSISTANT: (with BOS)")

    def _structural(self) -> Sequence[int]:
        return [self.image_token_id]

    def format(self, sample):
        from megatron_rcpa.data.vision import image_to_square

        pv = None
        ntok = [self.vision.tokens_per_image] * len(sample.images or ())
        if sample.images:
            pv = torch.stack([image_to_square(img, self.vision.image_size, self.settings) for img in sample.images])
        if self.chat_template is not None:
            ids = self.chat_prompt_ids(sample, self.image_token_id, ntok)
        else:
            if ntok and self.tok.token_id(self.IMAGE_TOKEN) != self.image_token_id:
                raise ValueError(f"the tokenizer's {self.IMAGE_TOKEN!r} is id {self.tok.token_id(self.IMAGE_TOKEN)}"
                                 f" but config.json's image_token_id is {self.image_token_id}")
            system = "" if self.system_prompt is None else f"{self.system_prompt} "
            images = self.IMAGE_TOKEN * len(ntok) + ("\n" if ntok else "")
            text = f"{system}USER: {images}{sample.prompt} ASSISTANT:"
            ids = self.encode_prompt(sample, text, self.image_token_id, ntok)
        return self._prompt_input(sample, ids, pixel_values=pv)


def _tiny_tokenizer():
    from megatron_rcpa.data.char_tokenizer import CharTokenizer

    return CharTokenizer(extra_specials=("<image>",))


def _tiny_config(tok):
    from megatron_rcpa.models.tiny import tiny_llava_config

    return tiny_llava_config(vision="clip", text="qwen2", vocab_size=tok.vocab_size,
                             image_token_id=tok.token_id("<image>"), vision_layers=2, image_size=28,
                             tie_word_embeddings=True)


def _save_tiny_hf(path: str, **kwargs: Any) -> str:
    from megatron_rcpa.models.tiny import save_tiny_llava

    return save_tiny_llava(path, **kwargs)


def _init_tiny_weights(policy, seed: int) -> None:
    """Decoder, ViT and projector per global name (all megatron modules, TP-sharded), each with its own seed."""
    from megatron_rcpa.runtime.weights import init_global_weights

    init_global_weights(policy.language_model, seed=seed)
    if policy.vision_model is not None:
        init_global_weights(policy.vision_model, seed=seed + 1)
        init_global_weights(policy.vision_projection, seed=seed + 2)


LLAVA = register(Family(
    name="llava",
    description="LLaVA: GPTModel + megatron CLIPViTModel (TP-sharded) + MultimodalProjector",
    architectures=("LlavaForConditionalGeneration",),
    hf_config=lambda config: _llava_call("llava_hf_config", config),
    decoder_dims=lambda config: _llava_call("llava_decoder_dims", config),
    policy_builder="megatron_rcpa.models.llava:build_llava_policy",
    table=_table,
    # transformers-5 in-memory names, and transformers-4 files (CLIP/SigLIP towers under ".vision_model.")
    hf_aliases=(("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                ("vision_tower.vision_model.", "vision_tower.")),
    ignore_hf=(r"\.rotary_emb\.inv_freq$", r"\.position_ids$"),
    tied_head="language_model.lm_head.weight",
    extra_layouts=_layouts,
    check_tp=_check_tp,
    prompt_format="megatron_rcpa.models.families.llava:LlavaPrompt",
    tiny_tokenizer=_tiny_tokenizer,
    tiny_config=_tiny_config,
    save_tiny_hf=_save_tiny_hf,
    init_tiny_weights=_init_tiny_weights,
    param_groups=(("projector", ("vision_projection.",)), ("vision", ("vision_model.",))),
    megatron_vision=True,
))
