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

    def make_prompt_format(self, tokenizer, hf_config, *, checkpoint: Optional[str] = None,
                           system_prompt: Optional[str] = None) -> PromptFormat:
        """The family's :class:`PromptFormat` (``system_prompt``: ``data.system_prompt``)."""
        if not self.prompt_format:
            raise ValueError(f"model family {self.name!r} has no prompt format ({self.description})")
        module, _, cls = self.prompt_format.partition(":")
        return getattr(importlib.import_module(module), cls)(tokenizer, hf_config, checkpoint=checkpoint,
                                                             system_prompt=system_prompt)

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


#: Prompt-format notes already printed (each once per process).
_SAID: set = set()


def _say_once(line: str) -> None:
    if line not in _SAID:
        _SAID.add(line)
        print(line, flush=True)


class PromptFormat:
    """A family's prompt format for the trainer: a data sample -> the rollout engine's prompt (ids with the
    family's image tokens, the images as the policy takes them, the reference ids), the token ids a rollout
    must never sample, and the vision inputs of a micro-batch's rows.

    With a chat template (the tokenizer's ``chat_template``: the checkpoint's ``hf_assets/``, or the character
    tokenizer's own), the prompt is ``apply_chat_template(messages, add_generation_prompt=True)`` as
    transformers builds it: ``messages`` are the sample's own (verl / TRL chat lists; ``<image>`` in string
    contents becomes an image part, as verl does), else one user turn of the images then the prompt text;
    ``system_prompt`` replaces the first system turn or is put before the others (without it the template's
    default applies, e.g. Qwen2.5-VL's "You are a helpful assistant."). A vision family's image placeholder
    (``image_token_id``) is then expanded to each image's token count, and the text is tokenized as the HF
    processor does (with the tokenizer's special tokens, e.g. LLaVA's BOS, unless the rendered text starts
    with BOS); a text family's as the tokenizer's ``apply_chat_template(tokenize=True)`` does (adding none).
    Without a template (base models) the family's built-in format is used, said once in the log."""

    family = ""
    #: How the rendered chat text is tokenized: True as a processor does (the tokenizer's special tokens added
    #: unless the text starts with BOS), False as a tokenizer's apply_chat_template does (none added).
    processor_tokenization = True

    def __init__(self, tokenizer, hf_config, *, checkpoint: Optional[str] = None,
                 system_prompt: Optional[str] = None) -> None:
        self.tok = tokenizer
        self.hf_config = hf_config
        self.checkpoint = checkpoint
        self.system_prompt = system_prompt
        self.chat_template = getattr(tokenizer, "chat_template", None) or None

    def _no_template_note(self, builtin: str) -> None:
        """Say once that the tokenizer has no chat template and ``builtin`` is used."""
        if self.chat_template is None:
            _say_once(f"[prompt] model.family={self.family}: the tokenizer has no chat template (a base model?); "
                      f"prompts use the built-in format {builtin}")

    def format(self, sample):
        """A data sample -> :class:`~megatron_rcpa.rollout.engine.PromptInput`."""
        raise NotImplementedError

    def __call__(self, sample):
        return self.format(sample)

    # ------------------------------------------------------------------------------------- chat template
    def chat_messages(self, sample, *, vision: bool = True) -> List[Dict[str, Any]]:
        """The conversation the chat template renders for ``sample`` (see the class docstring). ``vision``:
        contents as lists of parts with ``{"type": "image"}`` (HF processors' form), else plain strings."""
        n_images = len(sample.images or ())
        if sample.messages:
            messages = [{"role": m["role"], "content": _parts(m.get("content"))} for m in sample.messages]
        else:
            messages = [{"role": "user", "content": [{"type": "text", "text": sample.prompt}]}]
        placed = sum(p["type"] == "image" for m in messages for p in m["content"])
        if n_images and not placed:  # images the messages do not place go first in the first user turn
            first = next((m for m in messages if m["role"] == "user"), messages[0])
            first["content"] = [{"type": "image"} for _ in range(n_images)] + first["content"]
        elif placed != n_images:
            raise ValueError(f"sample {sample.id!r}: its messages place {placed} image(s) but it has {n_images}")
        if self.system_prompt is not None:
            system = {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]}
            messages = [system] + messages[1:] if messages[0]["role"] == "system" else [system] + messages
        if not vision:
            for m in messages:
                m["content"] = "".join(p["text"] for p in m["content"] if p["type"] == "text")
        return messages

    def chat_prompt_ids(self, sample, image_token_id: Optional[int] = None,
                        tokens_per_image: Sequence[int] = ()) -> List[int]:
        """``sample``'s prompt ids through the chat template, each ``image_token_id`` in the rendered text
        expanded to ``tokens_per_image[i]`` copies (in image order) as the HF processor does."""
        text = self.tok.apply_chat_template(self.chat_messages(sample, vision=image_token_id is not None),
                                            add_generation_prompt=True)
        return self.encode_prompt(sample, text, image_token_id, tokens_per_image)

    def encode_prompt(self, sample, text: str, image_token_id: Optional[int] = None,
                      tokens_per_image: Sequence[int] = ()) -> List[int]:
        """``text`` (a rendered prompt with one ``image_token_id`` per image) -> ids, placeholders expanded."""
        bos = getattr(self.tok, "bos_token", None)
        special = self.processor_tokenization and not (bos and text.startswith(bos))
        ids = self.tok.encode(text, add_special_tokens=special)
        if image_token_id is None:
            return ids
        found = ids.count(image_token_id)
        if found != len(tokens_per_image):
            raise ValueError(f"sample {sample.id!r}: the prompt holds {found} image placeholder(s) (token id "
                             f"{image_token_id}) but the sample has {len(tokens_per_image)} image(s)")
        out: List[int] = []
        counts = iter(tokens_per_image)
        for i in ids:
            out.extend([i] * next(counts) if i == image_token_id else [i])
        return out

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


def _parts(content: Any) -> List[Dict[str, Any]]:
    """A message's content as HF parts: ``<image>`` in text (verl) splits into ``{"type": "image"}`` parts."""
    if content is None:
        return []
    raw = [content] if isinstance(content, str) else list(content)
    out: List[Dict[str, Any]] = []
    for part in raw:
        if isinstance(part, dict) and (part.get("type") == "image" or (part.get("type") is None and "image" in part)):
            out.append({"type": "image"})
            continue
        text = part if isinstance(part, str) else part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"a message part is neither text nor an image: {part!r}")
        for i, piece in enumerate(text.split("<image>")):
            if i:
                out.append({"type": "image"})
            if piece:
                out.append({"type": "text", "text": piece})
    return out


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
