"""The model-family registry: one :class:`Family` record per family, each defined in its own module
(:mod:`.qwen2_5_vl`, :mod:`.llava`, :mod:`.text_lm` for ``llama`` / ``qwen2``, :mod:`.gpt`), registered here.

A record says everything the rest of the code asks about a family: its HF architectures and config reader,
its policy builder, its converter table (parameter names, HF aliases, layouts, TP checks), its prompt format
(a :class:`PromptFormat`: prompt ids with image tokens, banned/structural tokens, the vision inputs of a
micro-batch), its tiny random model (tokenizer + HF config, and an HF checkpoint saver for tests) and how a
tiny model's weights are drawn. The trainer, the converters, config validation and the profiler ask the
registry (:func:`get`, :func:`names`, :func:`for_hf_config`); nothing else lists family names.

Importing this package imports neither megatron nor transformers (config validation reads :func:`names`);
policy builders are named as ``"module:function"`` and imported when called.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["Family", "PromptFormat", "for_hf_config", "get", "names", "register", "trainable_names"]

#: The modules that define the built-in families (each calls :func:`register` on import).
_BUILTIN_MODULES = ("qwen2_5_vl", "llava", "text_lm")
_REGISTRY: Dict[str, Family] = {}
_loaded = False


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything the code needs to know about one model family (fields left None: the family lacks it)."""

    name: str
    description: str
    #: rcpa-train trains it (False: the profiler's tiny GPT).
    trainable: bool = True
    #: HF ``architectures`` of config.json that select this family.
    architectures: Tuple[str, ...] = ()
    #: HF config object (or config.json dict) -> the family's HF config object (ConversionError naming the key).
    hf_config: Optional[Callable[[Any], Any]] = None
    #: HF config -> the decoder's sizes (DecoderDims).
    decoder_dims: Optional[Callable[[Any], Any]] = None
    #: "module:function" building this rank's policy stage: fn(hf_config, **kwargs).
    policy_builder: str = ""
    # ---- converters
    #: HF config -> the parameter-name table (megatron_rcpa.convert.weight_maps entries).
    table: Optional[Callable[[Any], Tuple[Any, ...]]] = None
    #: (transformers-5 in-memory prefix, on-disk prefix): in-memory names read from a file are mapped onto
    #: on-disk names; the converters write on-disk names.
    hf_aliases: Tuple[Tuple[str, str], ...] = ()
    #: HF tensors dropped silently when present (non-persistent buffers some exporters save).
    ignore_hf: Tuple[str, ...] = (r"\.rotary_emb\.inv_freq$",)
    #: The HF output head's on-disk name: absent from (or ignored in) checkpoints of tied models.
    tied_head: str = "lm_head.weight"
    #: HF config -> extra LayerLayouts by name (TensorMap.layout), besides "decoder".
    extra_layouts: Optional[Callable[[Any], Dict[str, Any]]] = None
    #: (HF config, TP) -> raise ValueError naming a size of the family's own modules TP does not divide.
    check_tp: Optional[Callable[[Any, int], None]] = None
    # ---- trainer
    #: "module:Class" of the family's :class:`PromptFormat`.
    prompt_format: str = ""
    #: () -> the tiny demo model's tokenizer; (tokenizer) -> its HF config (``model.tiny``).
    tiny_tokenizer: Optional[Callable[[], Any]] = None
    tiny_config: Optional[Callable[[Any], Any]] = None
    #: (path, seed=, dtype=, **config) -> a tiny random HF checkpoint saved under path (tests, demos).
    save_tiny_hf: Optional[Callable[..., str]] = None
    #: (policy, seed) -> draw a tiny policy's weights per tensor from its global name (layout-invariant).
    init_tiny_weights: Optional[Callable[[torch.nn.Module, int], None]] = None
    #: Parameter groups a run may freeze (``model.freeze_vision`` / ``freeze_projector``): (group, name
    #: prefixes on the policy); a parameter belongs to the first group whose prefix it starts with.
    param_groups: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
    #: The vision tower is megatron's (TP-sharded) ViT, built from a ``vision_layer_spec`` (LLaVA); False: none,
    #: or HF code (Qwen2.5-VL's tower follows ``vision_attn_implementation``).
    megatron_vision: bool = False

    def param_group(self, name: str) -> Optional[str]:
        """The freezable group of the policy parameter ``name`` (None: the language model)."""
        for group, prefixes in self.param_groups:
            if any(name.startswith(p) for p in prefixes):
                return group
        return None

    # ------------------------------------------------------------------------------------------ policy
    def build_policy(self, hf_config: Any, **kwargs: Any):
        """This rank's policy stage (current megatron TP/PP) from an HF config; ``kwargs`` go to the builder."""
        if not self.policy_builder:
            raise ValueError(f"model family {self.name!r} has no policy builder ({self.description})")
        module, _, fn = self.policy_builder.partition(":")
        return getattr(importlib.import_module(module), fn)(self.hf_config(hf_config), **kwargs)

    def make_prompt_format(self, tokenizer, hf_config, *, checkpoint: Optional[str] = None) -> PromptFormat:
        if not self.prompt_format:
            raise ValueError(f"model family {self.name!r} has no prompt format ({self.description})")
        module, _, cls = self.prompt_format.partition(":")
        return getattr(importlib.import_module(module), cls)(tokenizer, hf_config, checkpoint=checkpoint)

    def tiny_tokenizer_and_config(self, **sizes: Any) -> Tuple[Any, Any]:
        """(tokenizer, HF config) of the family's tiny random demo model; ``sizes`` (``hidden_size``,
        ``num_layers``: ``model.tiny_hidden_size`` / ``tiny_num_layers``) only for families whose tiny model is
        sizable (the text LMs)."""
        if self.tiny_tokenizer is None or self.tiny_config is None:
            raise ValueError(f"model family {self.name!r} has no tiny demo model ({self.description})")
        tok = self.tiny_tokenizer()
        if not sizes:
            return tok, self.tiny_config(tok)
        try:
            return tok, self.tiny_config(tok, **sizes)
        except TypeError as exc:
            raise ValueError(f"model.tiny_hidden_size / model.tiny_num_layers size the text families' tiny model; "
                             f"model.family = {self.name!r} has a fixed tiny config (leave them 64 / 2)") from exc

    # -------------------------------------------------------------------------------------- converters
    def layout(self, hf_config: Any, padded_vocab_size: int):
        from megatron_rcpa.convert.weight_maps import LayerLayout

        dims = self.decoder_dims(hf_config)
        return LayerLayout(num_attention_heads=dims.num_attention_heads, num_kv_heads=dims.num_kv_heads,
                           head_dim=dims.head_dim, vocab_size=dims.vocab_size, padded_vocab_size=padded_vocab_size)

    def layouts(self, hf_config: Any, padded_vocab_size: int) -> Dict[str, Any]:
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

        from megatron_rcpa.convert.hf_io import normalize_name

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


class PromptFormat:
    """A family's prompt format for the trainer: a data sample -> the rollout engine's prompt (ids with the
    family's image tokens, the images as the policy takes them, the reference ids), the token ids a rollout
    must never sample, and the vision inputs of a micro-batch's rows."""

    family = ""

    def __init__(self, tokenizer, hf_config, *, checkpoint: Optional[str] = None) -> None:
        self.tok = tokenizer
        self.hf_config = hf_config
        self.checkpoint = checkpoint

    def format(self, sample):
        """A data sample -> :class:`~megatron_rcpa.rollout.engine.PromptInput`."""
        raise NotImplementedError

    def __call__(self, sample):
        return self.format(sample)

    def structural_ids(self) -> List[int]:
        """Token ids a rollout must never sample (image placeholders, chat structure, padding); EOS stays."""
        ids = {self.tok.pad_token_id, *self._structural()}
        return sorted(i for i in ids if i is not None and i != self.tok.eos_token_id)

    def _structural(self) -> Sequence[int]:
        return ()

    def micro_batch_inputs(self, prompts: Sequence[Any], rows: Sequence[Any]) -> Dict[str, torch.Tensor]:
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

    def _prompt_input(self, sample, prompt_ids: List[int], **images: Any):
        from megatron_rcpa.rollout.engine import PromptInput

        return PromptInput(key=sample.id, prompt_ids=prompt_ids, reference=sample.reference,
                           reference_ids=self._reference_ids(sample), **images)


# ---------------------------------------------------------------------------------------------- registry
def register(family: Family) -> Family:
    """Add a family (its name must be new); returns it."""
    if family.name in _REGISTRY and _REGISTRY[family.name] is not family:
        raise ValueError(f"model family {family.name!r} is registered already")
    _REGISTRY[family.name] = family
    return family


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(f"{__name__}.{module}")


def names() -> List[str]:
    """Every registered family name, in registration order."""
    _load_builtins()
    return list(_REGISTRY)


def trainable_names() -> List[str]:
    """The families rcpa-train trains."""
    return [n for n in names() if _REGISTRY[n].trainable]


def get(name: str) -> Family:
    """The family ``name``; ValueError naming the known ones otherwise."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {list(_REGISTRY)}") from None


def for_hf_config(config: Dict[str, Any]) -> Family:
    """The family of an HF ``config.json`` dict, from its ``architectures`` (else its ``model_type``);
    ValueError naming the supported architectures otherwise."""
    _load_builtins()
    convertible = [f for f in _REGISTRY.values() if f.table is not None]
    archs = config.get("architectures") or []
    for family in convertible:
        if any(a in family.architectures for a in archs):
            return family
    if not archs:
        for family in convertible:
            if config.get("model_type") == family.name:
                return family
    supported = sorted(a for f in convertible for a in f.architectures)
    raise ValueError(f"unknown architecture {archs or None} (model_type={config.get('model_type')!r}) in "
                     f"config.json; supported: {supported}")
