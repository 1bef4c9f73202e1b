"""A character-level tokenizer for the built-in tiny demo model (no hub, no training): every printable
ASCII character is one token, followed by the Qwen2.5-VL special tokens. Real runs use the checkpoint's
Hugging Face tokenizer through :class:`HFTokenizer`; both expose the same small interface the trainer uses:
``encode(text) -> ids``, ``decode(ids) -> text``, ``eos_token_id``, ``pad_token_id``, ``token_id(name)``,
``vocab_size``."""

from __future__ import annotations

import string
from typing import Dict, List, Sequence

QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>")


class CharTokenizer:
    def __init__(self, extra_specials: Sequence[str] = ()) -> None:
        """``extra_specials`` (e.g. LLaVA's ``"<image>"``) come after the Qwen2.5-VL special tokens."""
        chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
        self._specials = tuple(QWEN_SPECIALS) + tuple(extra_specials)
        self._itos: List[str] = list(chars) + list(self._specials)
        self._stoi: Dict[str, int] = {s: i for i, s in enumerate(self._itos)}
        self.eos_token_id = self._stoi["<|im_end|>"]
        self.pad_token_id = self._stoi["<|endoftext|>"]

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    @property
    def special_ids(self) -> Dict[str, int]:
        return {s: self._stoi[s] for s in self._specials}

    def token_id(self, name: str) -> int:
        return self._stoi[name]

    def encode(self, text: str) -> List[int]:
        unknown = sorted({ch for ch in text if ch not in self._stoi})
        if unknown:
            raise ValueError(f"CharTokenizer: characters outside printable ASCII: {unknown[:5]}")
        return [self._stoi[ch] for ch in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        n = len(self._itos) - len(self._specials)
        return "".join(self._itos[i] for i in ids if not (skip_special_tokens and i >= n) and 0 <= i < len(self._itos))


class HFTokenizer:
    """Adapter over a Hugging Face tokenizer (``AutoTokenizer.from_pretrained(dir)``)."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def token_id(self, name: str) -> int:
        i = self.tok.convert_tokens_to_ids(name)
        if i is None or i == self.tok.unk_token_id:
            raise ValueError(f"the tokenizer has no token {name!r}")
        return int(i)

    def encode(self, text: str) -> List[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
