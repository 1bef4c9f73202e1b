"""``Sample``, the unit of RCPA data (RCPA_SPEC section 1), and ``DataStats``, the count of skipped rows."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from PIL import Image

# Why a row can be skipped. Readers never stop on a bad row: they count it here and go on.
SKIP_REASONS = (
    "malformed_json",  # a JSONL line that is not a JSON object
    "non_utf8",  # a line or text field that is not valid UTF-8
    "empty_prompt",  # prompt missing, not text, or only whitespace
    "missing_reference",  # require_reference=True and the reference is missing/empty
    "missing_image",  # an image path that does not exist, or require_images=True and no image
    "unreadable_image",  # image bytes/base64/file that PIL cannot open
    "duplicate_id",  # an id already seen in this load (the first row wins)
    "invalid_reference",  # require_reference=True and the reference is not text (a dict, a list of dicts...)
    "malformed_messages",  # a chat-message prompt whose messages are not {role: str, content: str | parts}
    "image_count_mismatch",  # the messages hold <image> placeholders, but not one per image of the row
    "prompt_too_long",  # over the reader's max_prompt_chars, or the sampler's token check (data.max_prompt_tokens)
    "image_too_large",  # above max_pixels (oversize="skip"), or too large for PIL to decode at all
    "bad_image_shape",  # an aspect ratio above 200 (Qwen2-VL's processor refuses it) or a side of 0
)


@dataclass
class Sample:
    """One domain sample: ``images`` + ``prompt``, and the target response ``reference`` (may be None).

    ``meta`` holds the row's other fields (for the synthetic domains: ``kind``, ``answer``, ...). When a row
    gives several references (a list, e.g. several captions), ``reference`` is the first one and
    ``meta["all_references"]`` holds them all.

    A row whose prompt is a chat (verl, TRL conversational) keeps the whole message list, as the file has it, in
    ``messages`` (``[{"role": ..., "content": str | [parts]}]``; None for a plain-text prompt); ``prompt`` is then
    the user turns' text without ``<image>`` placeholders. ``data_source`` and ``extra_info`` are verl's columns
    of those names (None / empty when the row has none).
    """

    id: str
    prompt: str
    reference: Optional[str] = None
    images: List[Image.Image] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)
    messages: Optional[List[Dict[str, Any]]] = None
    data_source: Optional[str] = None
    extra_info: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataStats:
    """Rows read / kept and skipped rows per reason, with up to ``max_examples`` row ids per reason."""

    source: str = ""
    rows_read: int = 0
    rows_kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: Dict[str, List[str]] = field(default_factory=dict)
    max_examples: int = 5

    def skip(self, reason: str, row_id: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}: expected one of {SKIP_REASONS}")
        self.skipped[reason] += 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < self.max_examples:
            ids.append(str(row_id))

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: DataStats) -> DataStats:
        """Add ``other``'s counts into this one (sources joined); returns self."""
        self.source = ", ".join(s for s in (self.source, other.source) if s)
        self.rows_read += other.rows_read
        self.rows_kept += other.rows_kept
        for reason, n in other.skipped.items():
            self.skipped[reason] += n
            ids = self.examples.setdefault(reason, [])
            ids.extend(other.examples.get(reason, [])[: max(self.max_examples - len(ids), 0)])
        return self

    def as_dict(self) -> Dict[str, Any]:
        return {"source": self.source, "rows_read": self.rows_read, "rows_kept": self.rows_kept,
                "skipped": dict(self.skipped), "examples": {k: list(v) for k, v in self.examples.items()}}

    def summary(self) -> str:
        """One line for the log, e.g. ``data.jsonl: read 10 rows, kept 8, skipped 2: empty_prompt=2 (ids: a, b)``."""
        head = f"{self.source or '<data>'}: read {self.rows_read} rows, kept {self.rows_kept}"
        if not self.skipped:
            return head + ", skipped 0"
        parts = []
        for reason in SKIP_REASONS:
            n = self.skipped.get(reason, 0)
            if n:
                ids = self.examples.get(reason, [])
                more = ", ..." if n > len(ids) else ""
                parts.append(f"{reason}={n} (ids: {', '.join(ids)}{more})")
        return f"{head}, skipped {self.total_skipped}: " + "; ".join(parts)
