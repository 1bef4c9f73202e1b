"""Prompt text for a sample: the family's chat template with image placeholders, or a simple fallback.

``build_prompt(sample, processor_or_tokenizer, family)`` returns the prompt *string* that generation starts
from (the rollout appends the RCPA reference prefix after it and tokenises it with the images).

- When the object (an HF processor or tokenizer) has a chat template, it is applied to one user message
  (after an optional system message) with ``add_generation_prompt=True``. The message content is in the HF
  multimodal form ``[{"type": "image"}, ..., {"type": "text", "text": prompt}]`` when the object is a processor
  (it has an ``image_processor``) or its template mentions images; otherwise (a text-only template) it is a
  string with one placeholder per image, a newline, then the prompt. ``content_format`` forces either form.
- Without a chat template (or with ``None``) the fallback template is used (the LLaVA-1.5 conversation form)::

      {system}\\n                                    (only with a system prompt)
      USER: {placeholder}\\n ... (one per image){prompt} ASSISTANT:

The placeholder is ``image_placeholder`` when given, else the family's (``IMAGE_PLACEHOLDERS``:
``<|vision_start|><|image_pad|><|vision_end|>`` for Qwen2/2.5-VL, ``<image>`` for LLaVA and by default).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

IMAGE_PLACEHOLDERS: Dict[str, str] = {
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "llava": "<image>",
}
DEFAULT_IMAGE_PLACEHOLDER = "<image>"
CONTENT_FORMATS = ("auto", "list", "string")


def image_placeholder_for(family: Optional[str]) -> str:
    """The family's image placeholder (``<image>`` for an unknown or missing family)."""
    if family is None:
        return DEFAULT_IMAGE_PLACEHOLDER
    key = family.lower().replace("-", "_").replace(".", "_")
    return IMAGE_PLACEHOLDERS.get(key, DEFAULT_IMAGE_PLACEHOLDER)


def _template_owner(obj: Any) -> Any:
    """The object whose ``apply_chat_template`` has a template: ``obj`` itself, or its ``tokenizer``."""
    if obj is None:
        return None
    if hasattr(obj, "apply_chat_template") and getattr(obj, "chat_template", None):
        return obj
    tok = getattr(obj, "tokenizer", None)
    if tok is not None and hasattr(tok, "apply_chat_template") and getattr(tok, "chat_template", None):
        return tok
    return None


def _num_images(sample: Any) -> int:
    return len(getattr(sample, "images", None) or [])


def build_messages(sample: Any, system_prompt: Optional[str] = None, content_format: str = "list",
                   image_placeholder: str = DEFAULT_IMAGE_PLACEHOLDER) -> List[Dict[str, Any]]:
    """The chat messages for ``sample`` (``content_format`` ``list``: HF multimodal parts; ``string``: text)."""
    n = _num_images(sample)
    messages: List[Dict[str, Any]] = []
    if system_prompt:
        if content_format == "list":
            messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
        else:
            messages.append({"role": "system", "content": system_prompt})
    if content_format == "list":
        content: Any = [{"type": "image"} for _ in range(n)] + [{"type": "text", "text": sample.prompt}]
    else:
        content = "".join(image_placeholder + "\n" for _ in range(n)) + sample.prompt
    messages.append({"role": "user", "content": content})
    return messages


def fallback_prompt(sample: Any, system_prompt: Optional[str] = None,
                    image_placeholder: str = DEFAULT_IMAGE_PLACEHOLDER) -> str:
    """The documented fallback template (see the module docstring)."""
    system = f"{system_prompt}\n" if system_prompt else ""
    images = "".join(image_placeholder + "\n" for _ in range(_num_images(sample)))
    return f"{system}USER: {images}{sample.prompt} ASSISTANT:"


def build_prompt(sample: Any, processor_or_tokenizer: Any = None, family: Optional[str] = None, *,
                 system_prompt: Optional[str] = None, image_placeholder: Optional[str] = None,
                 content_format: str = "auto") -> str:
    """The generation prompt for ``sample`` (see the module docstring)."""
    if content_format not in CONTENT_FORMATS:
        raise ValueError(f"build_prompt content_format = {content_format!r}: expected one of {CONTENT_FORMATS}")
    placeholder = image_placeholder if image_placeholder is not None else image_placeholder_for(family)
    owner = _template_owner(processor_or_tokenizer)
    if owner is None:
        return fallback_prompt(sample, system_prompt, placeholder)
    if content_format == "auto":
        is_processor = getattr(owner, "image_processor", None) is not None
        template = owner.chat_template if isinstance(owner.chat_template, str) else str(owner.chat_template)
        content_format = "list" if is_processor or "image" in template else "string"
    messages = build_messages(sample, system_prompt, content_format, placeholder)
    out = owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if isinstance(out, list):  # some processors return one string per conversation
        out = out[0]
    if not isinstance(out, str):
        raise TypeError(f"build_prompt: {type(owner).__name__}.apply_chat_template returned {type(out).__name__}, "
                        "expected a string")
    return out
