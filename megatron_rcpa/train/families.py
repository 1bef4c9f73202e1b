"""What the trainer needs to know per model family, besides the policy itself: the tokenizer and HF config
(from a converted checkpoint, or the built-in tiny demo model), the prompt format with its image tokens,
the vision inputs of a micro-batch, the forward the training step runs, and the tokens a rollout must never
sample.

=============  =====================================================  ======================================
family         prompt                                                 images
=============  =====================================================  ======================================
qwen2_5_vl     ChatML; one ``<|image_pad|>`` run per image            patches + ``image_grid_thw`` per image
llava          ``USER: <image>...\\n{prompt} ASSISTANT:`` (LLaVA-1.5)  ``[3, S, S]`` per image, ``tokens_per_image``
                                                                      ``<image>`` tokens each
llama, qwen2   ``User: {prompt}\\nAssistant:``                         none (a sample with images is an error)
=============  =====================================================  ======================================
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_rcpa.rollout.engine import PromptInput

__all__ = ["FAMILIES", "FamilyAdapter", "adapter_for", "build_tokenizer_and_config"]

FAMILIES = ("qwen2_5_vl", "llava", "llama", "qwen2")
# checkpoint metadata ``extra`` key of a model.tiny run: its character tokenizer, so that the trainer checkpoint's
# ``policy/`` can start another run (``model.checkpoint=<run>/checkpoints/step_N/policy``) without HF tokenizer files
CHAR_TOKENIZER_KEY = "char_tokenizer"


def char_tokenizer_metadata(tok) -> dict:
    """``{CHAR_TOKENIZER_KEY: {...}}`` for a checkpoint's metadata when ``tok`` is the built-in character
    tokenizer, else {}."""
    from megatron_rcpa.data.char_tokenizer import QWEN_SPECIALS, CharTokenizer

    if not isinstance(tok, CharTokenizer):
        return {}
    return {CHAR_TOKENIZER_KEY: {"extra_specials": [s for s in tok.special_ids if s not in QWEN_SPECIALS]}}


def build_tokenizer_and_config(cfg) -> Tuple[Any, Any]:
    """(tokenizer, HF config object) of the run's policy: the checkpoint's (its family must be
    ``model.family``), or a tiny random model's for ``model.tiny``."""
    family = cfg.model.family
    if family not in FAMILIES:
        raise ValueError(f"model.family = {family!r} is for tools/profile_throughput.py only; rcpa-train trains "
                         f"one of {list(FAMILIES)}")
    if cfg.model.tiny:
        return _tiny_tokenizer_and_config(family, cfg)
    if not cfg.model.checkpoint:
        raise ValueError("model.checkpoint is required unless model.tiny=true (convert one with "
                         "tools/convert_hf_to_megatron.py)")
    from transformers import AutoTokenizer

    from megatron_rcpa.convert.checkpoint import ASSETS_DIR, read_metadata
    from megatron_rcpa.convert.families import family_by_name
    from megatron_rcpa.data.char_tokenizer import CharTokenizer, HFTokenizer

    meta = read_metadata(cfg.model.checkpoint)
    if meta.family != family:
        raise ValueError(f"model.family = {family!r} but {cfg.model.checkpoint!r} holds a {meta.family!r} model; "
                         f"set model.family={meta.family}")
    assets = os.path.join(cfg.model.checkpoint, ASSETS_DIR)
    char = meta.extra.get(CHAR_TOKENIZER_KEY)
    if char is not None and not os.path.isdir(assets):  # a trainer checkpoint of a model.tiny run
        tok = CharTokenizer(extra_specials=tuple(char.get("extra_specials", ())))
        if tok.vocab_size != meta.vocab_size:
            raise ValueError(f"{cfg.model.checkpoint!r} was trained with a character tokenizer of "
                             f"{meta.vocab_size} tokens but this one has {tok.vocab_size}")
        return tok, family_by_name(family).hf_config(meta.hf_config)
    try:
        tok = HFTokenizer(AutoTokenizer.from_pretrained(assets))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{cfg.model.checkpoint!r}: no usable tokenizer in {ASSETS_DIR}/ ({exc}); convert the "
                         "checkpoint from an HF directory that has one") from exc
    return tok, family_by_name(family).hf_config(meta.hf_config)


def _tiny_tokenizer_and_config(family: str, cfg) -> Tuple[Any, Any]:
    from megatron_rcpa.data.char_tokenizer import CharTokenizer
    from megatron_rcpa.models import tiny

    if family in ("qwen2_5_vl", "llava") and (cfg.model.tiny_hidden_size, cfg.model.tiny_num_layers) != (64, 2):
        raise ValueError(f"model.tiny_hidden_size / model.tiny_num_layers size the text families' tiny model "
                         f"(llama, qwen2); model.family = {family!r} has a fixed tiny config (leave them 64 / 2)")
    if family == "qwen2_5_vl":
        tok = CharTokenizer()
        return tok, tiny.tiny_qwen2_5_vl_config(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2,
                                                tie_word_embeddings=True)
    if family == "llava":
        tok = CharTokenizer(extra_specials=("<image>",))
        return tok, tiny.tiny_llava_config(vision="clip", text="qwen2", vocab_size=tok.vocab_size,
                                           image_token_id=tok.token_id("<image>"), vision_layers=2,
                                           image_size=28, tie_word_embeddings=True)
    tok = CharTokenizer()
    import transformers

    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
    hidden = cfg.model.tiny_hidden_size
    return tok, config_cls(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=cfg.model.tiny_num_layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=1024, tie_word_embeddings=True)


class FamilyAdapter:
    """The family-specific pieces of a training step (see the module docstring)."""

    family = ""

    def __init__(self, tokenizer, hf_config, *, checkpoint: Optional[str] = None) -> None:
        self.tok = tokenizer
        self.hf_config = hf_config
        self.checkpoint = checkpoint

    # the policy's forward for train/step.py: fn(model, micro-batch dict) -> vocab-parallel logits
    forward_fn: Callable[[torch.nn.Module, Dict[str, torch.Tensor]], torch.Tensor]

    def format(self, sample) -> PromptInput:
        """A data sample -> the rollout engine's prompt (ids with image tokens, images, reference ids)."""
        raise NotImplementedError

    def __call__(self, sample) -> PromptInput:
        return self.format(sample)

    def structural_ids(self) -> List[int]:
        """Token ids a rollout must never sample (image placeholders, chat structure, padding); EOS stays."""
        ids = {self.tok.pad_token_id, *self._structural()}
        return sorted(i for i in ids if i is not None and i != self.tok.eos_token_id)

    def _structural(self) -> Sequence[int]:
        return ()

    def micro_batch_inputs(self, prompts: Sequence[PromptInput], rows: Sequence[Any]) -> Dict[str, torch.Tensor]:
        """The vision inputs of the rollouts ``rows`` (each with a ``prompt_id`` into ``prompts``), in row order."""
        pv = [prompts[r.prompt_id].pixel_values for r in rows if prompts[r.prompt_id].pixel_values is not None]
        if not pv:
            return {}
        out = {"pixel_values": torch.cat(pv)}
        grids = [prompts[r.prompt_id].image_grid_thw for r in rows if prompts[r.prompt_id].image_grid_thw is not None]
        if grids:
            out["image_grid_thw"] = torch.cat(grids)
        return out

    def _reference_ids(self, sample) -> Optional[List[int]]:
        return self.tok.encode(sample.reference) + [self.tok.eos_token_id] if sample.reference is not None else None


class Qwen2_5_VLAdapter(FamilyAdapter):
    """ChatML prompt with ``<|vision_start|><|image_pad|>*n<|vision_end|>`` per image."""

    family = "qwen2_5_vl"
    _NAMES = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")

    def __init__(self, tokenizer, hf_config, **kwargs: Any) -> None:
        from megatron_rcpa.data.vision import VisionSpec
        from megatron_rcpa.models.qwen2_5_vl import trainer_forward

        super().__init__(tokenizer, hf_config, **kwargs)
        self.spec = VisionSpec.from_hf_config(hf_config)
        self.ids = {n: tokenizer.token_id(n) for n in self._NAMES}
        self.forward_fn = trainer_forward

    def _structural(self) -> Sequence[int]:
        ids = list(self.ids.values())
        try:
            ids.append(self.tok.token_id("<|video_pad|>"))
        except (KeyError, ValueError):
            pass
        return ids

    def format(self, sample) -> PromptInput:
        from megatron_rcpa.data.vision import images_to_inputs

        e, i = self.tok.encode, self.ids
        ids = [i["<|im_start|>"]] + e("user\n")
        pv = grid = None
        if sample.images:
            pv, grid, ntok = images_to_inputs(sample.images, self.spec)
            for n in ntok:
                ids += [i["<|vision_start|>"]] + [i["<|image_pad|>"]] * n + [i["<|vision_end|>"]]
        ids += e(sample.prompt) + [i["<|im_end|>"]] + e("\n") + [i["<|im_start|>"]] + e("assistant\n")
        return PromptInput(key=sample.id, prompt_ids=ids, pixel_values=pv, image_grid_thw=grid,
                           reference=sample.reference, reference_ids=self._reference_ids(sample))


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


class LlavaAdapter(FamilyAdapter):
    """LLaVA-1.5's prompt, ``USER: <image>*n\\n{prompt} ASSISTANT:``, the images as the HF processor makes them
    (``[3, S, S]``, normalised with the checkpoint's processor settings)."""

    family = "llava"

    def __init__(self, tokenizer, hf_config, **kwargs: Any) -> None:
        from megatron_rcpa.models.llava import llava_trainer_forward, llava_vision_dims

        super().__init__(tokenizer, hf_config, **kwargs)
        self.vision = llava_vision_dims(hf_config)
        self.image_token_id = int(hf_config.image_token_id)
        self.settings = _processor_settings(self.checkpoint)
        self.forward_fn = llava_trainer_forward

    def _structural(self) -> Sequence[int]:
        return [self.image_token_id]

    def format(self, sample) -> PromptInput:
        from megatron_rcpa.data.vision import image_to_square

        e = self.tok.encode
        ids = e("USER: ")
        pv = None
        if sample.images:
            pv = torch.stack([image_to_square(img, self.vision.image_size, self.settings) for img in sample.images])
            ids += [self.image_token_id] * (self.vision.tokens_per_image * len(sample.images)) + e("\n")
        ids += e(sample.prompt) + e(" ASSISTANT:")
        return PromptInput(key=sample.id, prompt_ids=ids, pixel_values=pv, reference=sample.reference,
                           reference_ids=self._reference_ids(sample))


class TextAdapter(FamilyAdapter):
    """A plain text prompt, ``User: {prompt}\\nAssistant:``; samples with images are refused."""

    def __init__(self, tokenizer, hf_config, **kwargs: Any) -> None:
        from megatron_rcpa.models.text_lm import text_trainer_forward

        super().__init__(tokenizer, hf_config, **kwargs)
        self.family = hf_config.model_type
        self.forward_fn = text_trainer_forward

    def format(self, sample) -> PromptInput:
        if sample.images:
            raise ValueError(f"sample {sample.id!r} has images but model.family={self.family!r} is a text model")
        ids = self.tok.encode(f"User: {sample.prompt}\nAssistant:")
        return PromptInput(key=sample.id, prompt_ids=ids, reference=sample.reference,
                           reference_ids=self._reference_ids(sample))


def adapter_for(family: str, tokenizer, hf_config, *, checkpoint: Optional[str] = None) -> FamilyAdapter:
    cls = {"qwen2_5_vl": Qwen2_5_VLAdapter, "llava": LlavaAdapter, "llama": TextAdapter,
           "qwen2": TextAdapter}.get(family)
    if cls is None:
        raise ValueError(f"model.family = {family!r}; expected one of {list(FAMILIES)}")
    return cls(tokenizer, hf_config, checkpoint=checkpoint)
