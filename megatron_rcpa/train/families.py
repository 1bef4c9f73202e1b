"""What the trainer asks the model-family registry (:mod:`megatron_rcpa.models.families`): the tokenizer and
HF config of the run's policy (from a converted checkpoint, or the family's tiny demo model), and the family's
prompt format (:class:`~megatron_rcpa.models.families.PromptFormat`: prompt ids with image tokens, the vision
inputs of a micro-batch, the tokens a rollout must never sample).

=============  =====================================================  ======================================
family         prompt                                                 images
=============  =====================================================  ======================================
qwen2_5_vl     chat template; one ``<|image_pad|>`` run per image     patches + ``image_grid_thw`` per image
llava          chat template, BOS (LLaVA-1.5 form without one)        ``[3, S, S]`` per image, ``tokens_per_image``
                                                                      ``<image>`` tokens each
llama, qwen2   chat template (``User: {prompt}\\nAssistant:`` without)  none (a sample with images is an error)
=============  =====================================================  ======================================

Prompts go through the tokenizer's chat template when it has one (see
:class:`~megatron_rcpa.models.families.PromptFormat`), with ``data.system_prompt`` as the system turn.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

from megatron_rcpa.models import families
from megatron_rcpa.models.families import PromptFormat

__all__ = ["adapter_for", "build_tokenizer_and_config"]


def _trainable(name: str):
    family = families.get(name)
    if not family.trainable:
        raise ValueError(f"model.family = {name!r} is registered as not trainable; rcpa-train trains "
                         f"one of {families.trainable_names()}")
    return family


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
    family = _trainable(cfg.model.family)
    if cfg.model.tiny:
        sizes = {}
        if (cfg.model.tiny_hidden_size, cfg.model.tiny_num_layers) != (64, 2):
            sizes = dict(hidden_size=cfg.model.tiny_hidden_size, num_layers=cfg.model.tiny_num_layers)
        return family.tiny_tokenizer_and_config(**sizes)
    if not cfg.model.checkpoint:
        raise ValueError("model.checkpoint is required unless model.tiny=true (convert one with "
                         "tools/convert_hf_to_megatron.py)")
    from transformers import AutoTokenizer

    from megatron_rcpa.convert.checkpoint import ASSETS_DIR, read_metadata
    from megatron_rcpa.data.char_tokenizer import CharTokenizer, HFTokenizer

    meta = read_metadata(cfg.model.checkpoint)
    if meta.family != family.name:
        raise ValueError(f"model.family = {family.name!r} but {cfg.model.checkpoint!r} holds a {meta.family!r} "
                         f"model; set model.family={meta.family}")
    assets = os.path.join(cfg.model.checkpoint, ASSETS_DIR)
    char = meta.extra.get(CHAR_TOKENIZER_KEY)
    if char is not None and not os.path.isdir(assets):  # a trainer checkpoint of a model.tiny run
        tok = CharTokenizer(extra_specials=tuple(char.get("extra_specials", ())))
        if tok.vocab_size != meta.vocab_size:
            raise ValueError(f"{cfg.model.checkpoint!r} was trained with a character tokenizer of "
                             f"{meta.vocab_size} tokens but this one has {tok.vocab_size}")
        return tok, family.hf_config(meta.hf_config)
    try:
        tok = HFTokenizer(AutoTokenizer.from_pretrained(assets, trust_remote_code=False))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{cfg.model.checkpoint!r}: no usable tokenizer in {ASSETS_DIR}/ ({exc}); convert the "
                         "checkpoint from an HF directory that has one") from exc
    return tok, family.hf_config(meta.hf_config)


def adapter_for(family: str, tokenizer, hf_config, *, checkpoint: Optional[str] = None,
                system_prompt: Optional[str] = None) -> PromptFormat:
    """The family's prompt format for this tokenizer / HF config (``checkpoint``: where its processor
    settings live; ``system_prompt``: ``data.system_prompt``)."""
    return _trainable(family).make_prompt_format(tokenizer, hf_config, checkpoint=checkpoint,
                                                 system_prompt=system_prompt)
