"""A character-level tokenizer for the built-in tiny demo model (no hub, no training): every printable
ASCII character is one token, followed by the Qwen2.5-VL special tokens. Real runs use the checkpoint's
Hugging Face tokenizer through :class:`HFTokenizer`; both expose the same small interface the trainer uses:
``encode(text) -> ids``, ``decode(ids) -> text``, ``eos_token_id``, ``pad_token_id``, ``token_id(name)``,
``vocab_size``, ``chat_template`` (None: the checkpoint has none) and ``apply_chat_template(messages)``.

The character tokenizer has a chat template of its own (:data:`CHAR_CHAT_TEMPLATE`, ChatML-like, no default
system turn), so the demo builds its prompts through the same chat-template code as a real checkpoint.
Its ``encode`` reads special-token strings in the text as single tokens (as HF tokenizers do).
"""

from __future__ import annotations

import re
import string
from typing import Any, Dict, List, Optional, Sequence

QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>")

#: The character tokenizer's chat template: ChatML turns; an image part (or a string content's ``<image>``
#: placeholder, verl style) renders as ``image_token`` (the Qwen2.5-VL vision run, or LLaVA's ``<image>``).
CHAR_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | replace('<image>', image_token) }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}{{ image_token }}"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_IMAGE_RUN = "<|vision_start|><|image_pad|><|vision_end|>"


def render_chat_template(template: str, messages: Sequence[Dict[str, Any]], *, add_generation_prompt: bool = True,
                         **variables: Any) -> str:
    """``template`` (jinja, as HF chat templates are written) rendered for ``messages``."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                            **variables)


class CharTokenizer:
    def __init__(self, extra_specials: Sequence[str] = ()) -> None:
        """``extra_specials`` (e.g. LLaVA's ``"<image>"``) come after the Qwen2.5-VL special tokens; with
        ``"<image>"`` among them the chat template renders an image as ``<image>`` (LLaVA), else as the
        Qwen2.5-VL vision run."""
        chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
        self._specials = tuple(QWEN_SPECIALS) + tuple(extra_specials)
        self._itos: List[str] = list(chars) + list(self._specials)
        self._stoi: Dict[str, int] = {s: i for i, s in enumerate(self._itos)}
        self.eos_token_id = self._stoi["<|im_end|>"]
        self.pad_token_id = self._stoi["<|endoftext|>"]
        self.bos_token: Optional[str] = None
        self.chat_template: Optional[str] = CHAR_CHAT_TEMPLATE
        self.image_token = "<image>" if "<image>" in extra_specials else QWEN_IMAGE_RUN
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in sorted(self._specials, key=len,
                                                                                      reverse=True)) + ")")

    def apply_chat_template(self, messages: Sequence[Dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages`` (:data:`CHAR_CHAT_TEMPLATE`)."""
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    image_token=self.image_token)

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    @property
    def special_ids(self) -> Dict[str, int]:
        return {s: self._stoi[s] for s in self._specials}

    def token_id(self, name: str) -> int:
        return self._stoi[name]

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        """One id per character; a special token's text (``<|im_start|>``...) is its one id. There is no BOS:
        ``add_special_tokens`` adds nothing."""
        unknown = sorted({ch for ch in text if ch not in self._stoi})
        if unknown:
            raise ValueError(f"CharTokenizer: characters outside printable ASCII: {unknown[:5]}")
        ids: List[int] = []
        for i, piece in enumerate(self._special_re.split(text)):
            ids.extend([self._stoi[piece]] if i % 2 else [self._stoi[ch] for ch in piece])
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        n = len(self._itos) - len(self._specials)
        return "".join(self._itos[i] for i in ids if not (skip_special_tokens and i >= n) and 0 <= i < len(self._itos))


class HFTokenizer:
    """Adapter over a Hugging Face tokenizer (``AutoTokenizer.from_pretrained(dir)``)."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.bos_token: Optional[str] = tokenizer.bos_token

    @property
    def chat_template(self) -> Optional[str]:
        """The checkpoint's chat template (its tokenizer's, e.g. from ``chat_template.jinja``); None: none."""
        template = getattr(self.tok, "chat_template", None)
        return template or None

    def apply_chat_template(self, messages: Sequence[Dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages`` rendered by the checkpoint's chat template (as transformers does)."""
        return self.tok.apply_chat_template(list(messages), tokenize=False,
                                            add_generation_prompt=add_generation_prompt)

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def token_id(self, name: str) -> int:
        i = self.tok.convert_tokens_to_ids(name)
        if i is None or i == self.tok.unk_token_id:
            raise ValueError(f"the tokenizer has no token {name!r}")
        return int(i)

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        """Token ids of ``text``; ``add_special_tokens``: with what the tokenizer adds (e.g. Llama's BOS)."""
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
