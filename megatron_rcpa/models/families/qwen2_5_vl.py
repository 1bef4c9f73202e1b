"""The ``qwen2_5_vl`` family: HF ``Qwen2_5_VLForConditionalGeneration`` -> :mod:`megatron_rcpa.models.qwen2_5_vl`.

Prompt: the checkpoint's chat template (Qwen2.5-VL's ChatML with its default system turn; the tiny demo's
character tokenizer has a ChatML template of its own), each image's ``<|image_pad|>`` expanded to n tokens (n =
the image's merged patches) as ``Qwen2_5_VLProcessor`` does; without a template the built-in ChatML (no system
turn). Images are resized by the processor's ``smart_resize`` rule (the checkpoint's ``preprocessor_config.json``
``min_pixels`` / ``max_pixels``, else the processor's defaults) and cut into flattened patches with one
``image_grid_thw`` row each.
"""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple

from megatron_rcpa.convert.errors import ConversionError
from megatron_rcpa.convert.weight_maps import Entry, ModuleMap, decoder_tensor_maps
from megatron_rcpa.models.families import Family, PromptFormat, register


def _hf_config(hf_config: Any):
    from megatron_rcpa.convert.hf_io import load_hf_config

    if isinstance(hf_config, dict):
        hf_config = load_hf_config(hf_config)
    if getattr(hf_config, "model_type", None) != "qwen2_5_vl":
        model_type = getattr(hf_config, "model_type", None)
        raise ConversionError(f"expected a qwen2_5_vl config, got model_type={model_type!r}")
    return hf_config


def _decoder_dims(hf_config: Any):
    from megatron_rcpa.models.qwen2_5_vl_config import qwen2_5_vl_decoder_dims

    return qwen2_5_vl_decoder_dims(_hf_config(hf_config))


def _table(hf_config: Any) -> Tuple[Entry, ...]:
    dims = _decoder_dims(hf_config)
    decoder = decoder_tensor_maps(megatron_prefix="language_model.", hf_prefix="model.", lm_head="lm_head.weight",
                                  qkv_bias=True, tied=dims.tie_word_embeddings)
    return decoder + (ModuleMap(megatron_prefix="vision_model.", hf_prefix="visual."),)


class Qwen2_5_VLPrompt(PromptFormat):
    """The chat template's prompt (else ChatML) with ``<|vision_start|><|image_pad|>*n<|vision_end|>`` per image."""

    family = "qwen2_5_vl"
    _NAMES = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")

    def __init__(self, tokenizer, hf_config, **kwargs: Any) -> None:
        from megatron_rcpa.data.vision import VisionSpec, qwen_pixel_limits
        from megatron_rcpa.models.families.llava import _processor_settings

        super().__init__(tokenizer, hf_config, **kwargs)
        self.spec = VisionSpec.from_hf_config(hf_config)
        self.ids = {n: tokenizer.token_id(n) for n in self._NAMES}
        self.settings = _processor_settings(self.checkpoint)
        self.min_pixels, self.max_pixels = qwen_pixel_limits(self.settings)
        self._no_template_note("ChatML: <|im_start|>user\\n{images}{prompt}<|im_end|>\\n<|im_start|>assistant\\n")

    def _structural(self) -> Sequence[int]:
        ids = list(self.ids.values())
        try:
            ids.append(self.tok.token_id("<|video_pad|>"))
        except (KeyError, ValueError):
            pass
        return ids

    def format(self, sample):
        from megatron_rcpa.data.vision import images_to_inputs

        pv = grid = None
        ntok: List[int] = []
        if sample.images:
            pv, grid, ntok = images_to_inputs(sample.images, self.spec, min_pixels=self.min_pixels,
                                              max_pixels=self.max_pixels, settings=self.settings)
        pad = self.ids["<|image_pad|>"]
        if self.chat_template is not None:
            ids = self.chat_prompt_ids(sample, pad, ntok)
        else:
            system = ("" if self.system_prompt is None
                      else f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n")
            run = "<|vision_start|><|image_pad|><|vision_end|>" * len(ntok)
            text = f"{system}<|im_start|>user\n{run}{sample.prompt}<|im_end|>\n<|im_start|>assistant\n"
            ids = self.encode_prompt(sample, text, pad, ntok)
        return self._prompt_input(sample, ids, pixel_values=pv, image_grid_thw=grid)


def _tiny_tokenizer():
    from megatron_rcpa.data.char_tokenizer import CharTokenizer

    return CharTokenizer()


def _tiny_config(tok):
    from megatron_rcpa.models.tiny import tiny_qwen2_5_vl_config

    return tiny_qwen2_5_vl_config(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, tie_word_embeddings=True)


def _save_tiny_hf(path: str, **kwargs: Any) -> str:
    from megatron_rcpa.models.tiny import save_tiny_qwen2_5_vl

    return save_tiny_qwen2_5_vl(path, **kwargs)


def _init_tiny_weights(policy, seed: int) -> None:
    """The decoder per global name (megatron's own CPU init is not PP-invariant, and tied embedding copies
    must start equal); the replicated HF vision tower per parameter name."""
    from megatron_rcpa.runtime.weights import init_global_weights, init_replicated_by_name

    init_global_weights(policy.language_model, seed=seed)
    if policy.vision_model is not None:
        init_replicated_by_name(policy.vision_model, seed, policy.config.init_method_std)


QWEN2_5_VL = register(Family(
    name="qwen2_5_vl",
    description="Qwen2.5-VL: GPTModel with MRoPE + the HF vision tower (replicated over TP)",
    architectures=("Qwen2_5_VLForConditionalGeneration",),
    hf_config=_hf_config,
    decoder_dims=_decoder_dims,
    policy_builder="megatron_rcpa.models.qwen2_5_vl:build_qwen2_5_vl_policy",
    table=_table,
    hf_aliases=(("model.language_model.", "model."), ("model.visual.", "visual.")),
    prompt_format="megatron_rcpa.models.families.qwen2_5_vl:Qwen2_5_VLPrompt",
    tiny_tokenizer=_tiny_tokenizer,
    tiny_config=_tiny_config,
    save_tiny_hf=_save_tiny_hf,
    init_tiny_weights=_init_tiny_weights,
    param_groups=(("projector", ("vision_model.merger.",)), ("vision", ("vision_model.",))),
))
