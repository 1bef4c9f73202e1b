"""The ``qwen2_5_vl`` family: HF ``Qwen2_5_VLForConditionalGeneration`` -> :mod:`megatron_rcpa.models.qwen2_5_vl`.

Prompt: ChatML, one ``<|vision_start|><|image_pad|>*n<|vision_end|>`` run per image (n = the image's merged
patches); images as flattened patches with one ``image_grid_thw`` row each.
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

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
    """ChatML prompt with ``<|vision_start|><|image_pad|>*n<|vision_end|>`` per image."""

    family = "qwen2_5_vl"
    _NAMES = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")

    def __init__(self, tokenizer, hf_config, **kwargs: Any) -> None:
        from megatron_rcpa.data.vision import VisionSpec

        super().__init__(tokenizer, hf_config, **kwargs)
        self.spec = VisionSpec.from_hf_config(hf_config)
        self.ids = {n: tokenizer.token_id(n) for n in self._NAMES}

    def _structural(self) -> Sequence[int]:
        ids = list(self.ids.values())
        try:
            ids.append(self.tok.token_id("<|video_pad|>"))
        except (KeyError, ValueError):
            pass
        return ids

    def format(self, sample):
        from megatron_rcpa.data.vision import images_to_inputs

        e, i = self.tok.encode, self.ids
        ids = [i["<|im_start|>"]] + e("user\n")
        pv = grid = None
        if sample.images:
            pv, grid, ntok = images_to_inputs(sample.images, self.spec)
            for n in ntok:
                ids += [i["<|vision_start|>"]] + [i["<|image_pad|>"]] * n + [i["<|vision_end|>"]]
        ids += e(sample.prompt) + [i["<|im_end|>"]] + e("\n") + [i["<|im_start|>"]] + e("assistant\n")
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
