"""Readers: JSONL (or a JSON array), parquet, a directory saved by HF ``datasets`` (``save_to_disk``), and a
hub-style dataset directory (a downloaded HF dataset repository of parquet / JSONL files, :func:`hub_dir_files`).

Every format yields rows (dicts) that become :class:`~.sample.Sample` s the same way. A field name may be a
dotted path into nested dicts (``reward_model.ground_truth``, ``extra_info.answer``); a key that exists
literally, dots included, wins.

- ``prompt`` (field name ``ReaderConfig.prompt_field``): non-empty text, else the row is skipped as
  ``empty_prompt``. Or a chat message list (verl, TRL conversational): ``[{"role": ..., "content": ...}]``
  with ``content`` a string or a list of parts (``{"type": "text", "text": ...}``, ``{"type": "image"}``); the
  list is kept as it is in ``Sample.messages`` and ``Sample.prompt`` is the text of the user turns (joined by
  newlines) without ``<image>`` placeholders. Placeholders (``<image>`` in the text, image parts) must number
  the row's images when there are any (else ``image_count_mismatch``); messages that are not of that shape are
  ``malformed_messages``. ``max_prompt_chars`` (characters of all turns) skips longer prompts as
  ``prompt_too_long`` (a cheap bound; the trainer checks the exact token count when it loads a sample).
- ``reference`` (``reference_field``; None: the first of :data:`REFERENCE_FIELDS` the row has: ``reference``,
  verl's ``reward_model.ground_truth``, TRL's ``completion``, ``solution``): text (numbers are turned into
  text); a message list (TRL ``completion``) gives its assistant turns' text; a list of texts keeps the first as
  ``reference`` and all in ``meta["all_references"]``. Missing/empty is ``None``, or a skipped
  ``missing_reference`` row when ``require_reference`` (``invalid_reference`` when it is there but not text).
- ``data_source`` and ``extra_info`` (a dict) go to ``Sample.data_source`` / ``Sample.extra_info``.
- images: the field ``image_field`` when set, else ``images`` (when present and not null), else ``image``;
  one value or a list. A value is
  a path (relative to the data file's folder, or absolute; ``file://`` allowed), raw bytes,
  ``{"bytes": ..., "path": ...}`` (how HF ``datasets`` stores an ``Image`` feature; bytes win), ``{"image": ...}``
  (verl / qwen-vl-utils style), a base64 string or a ``data:image/...;base64,`` URI.
  A path that does not exist is ``missing_image``; something PIL cannot open is ``unreadable_image``. A row
  without images is kept unless ``require_images``.
- image size, as Qwen2-VL's processor sees it (:mod:`.image_size`): an image whose ``smart_resize``-rounded
  size is above ``max_pixels`` is skipped as ``image_too_large`` (``oversize="skip"``, the default), or resized
  to ``smart_resize``'s size when the sample is loaded (``oversize="resize"``, which also scales images under
  ``min_pixels`` up); an aspect ratio above 200 is ``bad_image_shape``. Images inside the limits are untouched.
- ``id`` (``id_field``): the row's id when present, else ``<file name>:<n>`` with n the 1-based line
  number for JSONL and the 0-based row number for parquet / arrow. A repeated id is ``duplicate_id``.
- every other field goes to ``meta`` (a ``meta`` dict field is merged into it; binary values are dropped).

Bad rows are skipped and counted per reason in :class:`~.sample.DataStats` (never fatal); a data file that is
missing or cannot be read at all raises an error naming it.

Images are checked when the data is read (``verify_images="header"``: PIL opens and verifies the file without
decoding the pixels, which catches missing files, bad headers and PNG checksum errors; ``"full"`` decodes them;
``"none"`` only checks that paths exist, and reads the header for the size when pixel limits are set) and
decoded when a sample is accessed (``SampleDataset[i]``), converted to ``image_mode`` ("RGB"; None keeps the
file's mode; ``oversize="resize"`` resizes it then); ``preload=True`` decodes them all at read time and keeps
them in memory. An image that passed the header check but cannot be decoded (e.g. a truncated JPEG) raises
:class:`SampleLoadError` on access and is counted then as ``unreadable_image``; :class:`~.sampler.PromptSampler`
serves a substitute sample in its place.

The HF ``datasets`` directory is read with pyarrow directly (its ``state.json`` lists the Arrow stream
files), so ``datasets`` need not be installed; a ``DatasetDict`` directory needs ``split`` (default ``train``
when present, else the only split). A hub-style directory picks its split the same way.
"""

from __future__ import annotations

import base64
import binascii
import copy
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union, overload

from PIL import Image

from .image_size import (
    DEFAULT_FACTOR,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    OVERSIZE_MODES,
    above_max_pixels,
    bad_aspect_ratio,
    below_min_pixels,
    check_pixel_limits,
    smart_resize,
)
from .sample import DataStats, Sample

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
FORMATS = ("jsonl", "parquet", "hf_disk", "hub_dir")
VERIFY_MODES = ("header", "full", "none")
# reference_field=None: the first of these the row has (plain, verl, TRL conversational, TRL prompt/solution)
REFERENCE_FIELDS = ("reference", "reward_model.ground_truth", "completion", "solution")
IMAGE_PLACEHOLDER = "<image>"  # in message text (verl); counted against the row's images

_B64_RE = re.compile(r"[A-Za-z0-9+/=\s_-]+")


class DataFileError(OSError):
    """A data file (not a row) is missing or cannot be read."""


class SampleLoadError(DataFileError):
    """A sample's image passed the read-time check but cannot be decoded when the sample is accessed.

    :class:`~.sampler.PromptSampler` catches it and serves a substitute sample, so a run does not stop.
    """


@dataclass
class ReaderConfig:
    """How rows are read; the defaults of every reader live here."""

    prompt_field: str = "prompt"  # text, or a list of chat messages (verl / TRL conversational)
    reference_field: Optional[str] = None  # None: the first of REFERENCE_FIELDS that the row has
    image_field: Optional[str] = None  # None: "images" when present and not null, else "image"
    id_field: str = "id"
    data_source_field: str = "data_source"  # -> Sample.data_source (verl)
    extra_info_field: str = "extra_info"  # a dict -> Sample.extra_info (verl)
    require_reference: bool = False
    require_images: bool = False
    verify_images: str = "header"  # header | full | none
    image_mode: Optional[str] = "RGB"  # images are converted to this mode when loaded; None keeps it
    preload: bool = False  # decode every image at read time and keep it in memory
    split: Optional[str] = None  # HF DatasetDict directories: which split
    max_prompt_chars: Optional[int] = None  # longer prompts are skipped as prompt_too_long; None: no limit
    min_pixels: Optional[int] = DEFAULT_MIN_PIXELS  # oversize="resize" scales smaller images up (smart_resize)
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS  # larger images: skipped or scaled down (oversize); None: no limit
    image_factor: int = DEFAULT_FACTOR  # smart_resize's factor (patch_size * merge_size)
    oversize: str = "skip"  # skip | resize (to smart_resize's size, when the sample is loaded)

    def __post_init__(self) -> None:
        if self.verify_images not in VERIFY_MODES:
            raise ValueError(f"ReaderConfig.verify_images = {self.verify_images!r}: expected one of {VERIFY_MODES}")
        if self.oversize not in OVERSIZE_MODES:
            raise ValueError(f"ReaderConfig.oversize = {self.oversize!r}: expected one of {OVERSIZE_MODES}")
        if isinstance(self.image_factor, bool) or not isinstance(self.image_factor, int) or self.image_factor < 1:
            raise ValueError(f"ReaderConfig.image_factor = {self.image_factor!r}: expected a positive integer")
        check_pixel_limits(self.min_pixels, self.max_pixels, "ReaderConfig", self.image_factor)
        m = self.max_prompt_chars
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"ReaderConfig.max_prompt_chars = {m!r}: expected a positive integer or None")
        for name in ("prompt_field", "reference_field", "id_field", "data_source_field", "extra_info_field"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"ReaderConfig.{name} = {v!r}: expected a non-empty field name")


# ---------------------------------------------------------------------------------------------- images
@dataclass
class ImageSource:
    """Where one image comes from: a file path or encoded bytes."""

    path: Optional[str] = None
    data: Optional[bytes] = None

    def open(self) -> Image.Image:
        return Image.open(self.path) if self.path is not None else Image.open(io.BytesIO(self.data))

    def describe(self) -> str:
        return self.path if self.path is not None else f"<{len(self.data)} bytes>"


class _Skip(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _resolve_path(p: str, base_dir: Path) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else base_dir / path


def _decode_base64(s: str) -> bytes:
    if s.startswith("data:"):
        s = s.split(",", 1)[1] if "," in s else ""
    try:
        return base64.b64decode("".join(s.split()), validate=False, altchars=b"-_" if ("-" in s or "_" in s) else None)
    except (binascii.Error, ValueError) as exc:
        raise _Skip("unreadable_image") from exc


def _image_source(value: Any, base_dir: Path) -> ImageSource:
    if value is None:
        raise _Skip("missing_image")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return ImageSource(data=bytes(value))
    if isinstance(value, dict):
        if value.get("bytes"):
            return _image_source(bytes(value["bytes"]), base_dir)
        if value.get("path"):
            return _image_source(str(value["path"]), base_dir)
        if value.get("image") is not None:  # verl / Qwen-style {"image": "file://..." | path | bytes}
            return _image_source(value["image"], base_dir)
        raise _Skip("missing_image")
    if isinstance(value, str):
        if value.startswith("data:"):
            return ImageSource(data=_decode_base64(value))
        if value.startswith("file://"):
            value = value[len("file://"):]
        if len(value) < 4096:
            try:
                path = _resolve_path(value, base_dir)
                if path.is_file():
                    return ImageSource(path=str(path))
            except (OSError, ValueError):
                pass
        if len(value) >= 64 and _B64_RE.fullmatch(value):
            return ImageSource(data=_decode_base64(value))
        raise _Skip("missing_image")
    raise _Skip("unreadable_image")


def _check_image(src: ImageSource, cfg: ReaderConfig) -> None:
    """Read-time check of one image: its header (always, when pixel limits are set), the shape and pixel limits
    as the Qwen2-VL processor applies them, then ``verify_images``."""
    limits = cfg.max_pixels is not None or cfg.min_pixels is not None
    if cfg.verify_images == "none" and not limits:
        return
    try:
        with src.open() as img:
            w, h = img.size
            if bad_aspect_ratio(h, w):
                raise _Skip("bad_image_shape")
            if cfg.oversize == "skip" and above_max_pixels(h, w, cfg.max_pixels, cfg.image_factor):
                raise _Skip("image_too_large")
            if cfg.verify_images == "full":
                img.load()
            elif cfg.verify_images == "header":
                img.verify()
    except _Skip:
        raise
    except Image.DecompressionBombError as exc:  # > 2x PIL's MAX_IMAGE_PIXELS: PIL refuses to decode it
        raise _Skip("image_too_large") from exc
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise _Skip("unreadable_image") from exc


def load_image(src: ImageSource, mode: Optional[str] = "RGB") -> Image.Image:
    """Decode one image fully (the file is closed afterwards), converted to ``mode`` unless None."""
    with src.open() as img:
        img.load()
        out = img.convert(mode) if mode is not None and img.mode != mode else img.copy()
    return out


def fit_image(image: Image.Image, cfg: ReaderConfig) -> Image.Image:
    """``oversize="resize"``: an image outside [min_pixels, max_pixels] (by the processor's rounded size) is
    resized (bicubic, as the processor) to ``smart_resize``'s size; any other image is returned unchanged."""
    if cfg.oversize != "resize":
        return image
    w, h = image.size
    if not (above_max_pixels(h, w, cfg.max_pixels, cfg.image_factor)
            or below_min_pixels(h, w, cfg.min_pixels, cfg.image_factor)):
        return image
    new_h, new_w = smart_resize(h, w, cfg.image_factor, cfg.min_pixels or 0,
                                cfg.max_pixels if cfg.max_pixels is not None else h * w * 4)
    return image.resize((new_w, new_h), Image.BICUBIC)


# ---------------------------------------------------------------------------------------------- rows
def _text(value: Any) -> Optional[str]:
    """A text field: None stays None; bytes must be UTF-8; numbers become text; lone surrogates are non-UTF-8."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Skip("non_utf8") from exc
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _Skip("non_utf8") from exc
        return value
    return None


def get_field(row: Dict[str, Any], key: str) -> Any:
    """``row[key]``, or for a dotted key (``reward_model.ground_truth``) the nested value; None when absent.

    A key that exists literally (with its dots) wins over the nested path."""
    if key in row:
        return row[key]
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _is_messages(value: Any) -> bool:
    """A chat message list: a non-empty list of dicts that all have a ``role``."""
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(m, dict) and "role" in m for m in value))


def _message_parts(message: Dict[str, Any]) -> tuple:
    """(texts, image parts) of one message. ``content`` is a string (verl) or a list of parts (HF / TRL:
    ``{"type": "text", "text": ...}``, ``{"type": "image"}``); anything else is ``malformed_messages``."""
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str):
        raise _Skip("malformed_messages")
    if content is None:
        return [], 0
    if isinstance(content, (str, bytes, bytearray)):
        return [_text(content)], 0
    if not isinstance(content, (list, tuple)):
        raise _Skip("malformed_messages")
    texts, images = [], 0
    for part in content:
        if isinstance(part, str):
            texts.append(_text(part))
            continue
        if not isinstance(part, dict):
            raise _Skip("malformed_messages")
        kind = part.get("type")
        if kind == "text" or (kind is None and part.get("text") is not None):
            t = _text(part.get("text"))
            if t is None:
                raise _Skip("malformed_messages")
            texts.append(t)
        elif kind == "image" or (kind is None and "image" in part):
            images += 1
        else:
            raise _Skip("malformed_messages")
    return texts, images


def _messages_text(messages: Sequence[Dict[str, Any]], roles: Sequence[str]) -> tuple:
    """(text of the turns whose role is in ``roles`` with ``<image>`` removed, joined by newlines; the number of
    image placeholders in all turns; the characters of all turns)."""
    out, placeholders, chars = [], 0, 0
    for m in messages:
        texts, image_parts = _message_parts(m)
        joined = "".join(texts)
        placeholders += image_parts + joined.count(IMAGE_PLACEHOLDER)
        chars += len(joined)
        if m["role"] in roles:
            t = joined.replace(IMAGE_PLACEHOLDER, "").strip()
            if t:
                out.append(t)
    return "\n".join(out), placeholders, chars


def _plain_messages(messages: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """A JSON-like deep copy of a message list (parquet / arrow structs already are plain dicts and lists)."""
    return json.loads(json.dumps(list(messages), default=lambda o: None))


@dataclass
class _Record:
    id: str
    prompt: str
    reference: Optional[str]
    sources: List[ImageSource]
    meta: Dict[str, Any] = field(default_factory=dict)
    images: Optional[List[Image.Image]] = None  # decoded (preload)
    messages: Optional[List[Dict[str, Any]]] = None
    data_source: Optional[str] = None
    extra_info: Dict[str, Any] = field(default_factory=dict)


def _image_values(row: Dict[str, Any], cfg: ReaderConfig) -> List[Any]:
    if cfg.image_field is not None:
        value = get_field(row, cfg.image_field)
    else:
        value = row.get("images")
        if value is None:
            value = row.get("image")
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _prompt(row: Dict[str, Any], cfg: ReaderConfig) -> tuple:
    """(prompt text, messages or None, image placeholders, characters): see the module docstring."""
    value = get_field(row, cfg.prompt_field)
    if _is_messages(value):
        messages = _plain_messages(value)
        prompt, placeholders, chars = _messages_text(messages, ("user",))
        return prompt, messages, placeholders, chars
    if isinstance(value, (list, tuple)) and value:
        raise _Skip("malformed_messages")
    prompt = _text(value)
    return prompt, None, 0, len(prompt or "")


def _reference(row: Dict[str, Any], cfg: ReaderConfig, meta: Dict[str, Any]) -> tuple:
    """(reference or None, the top-level key it came from or None); raises ``_Skip`` when required and absent."""
    key = cfg.reference_field
    if key is None:
        key = next((k for k in REFERENCE_FIELDS if get_field(row, k) is not None), None)
    value = get_field(row, key) if key is not None else None
    reference, invalid = None, False
    if _is_messages(value):  # TRL conversational "completion": the assistant turns
        reference = _messages_text(value, ("assistant",))[0] or None
    elif isinstance(value, (list, tuple)):
        texts = [_text(v) for v in value]
        refs = [t for t in texts if t is not None and t.strip()]
        invalid = any(t is None and v is not None for t, v in zip(texts, value))
        if refs:
            meta["all_references"] = refs
        reference = refs[0] if refs else None
    else:
        reference = _text(value)
        invalid = reference is None and value is not None
        if reference is not None and not reference.strip():
            reference = None
    if cfg.require_reference:
        if invalid and reference is None:
            raise _Skip("invalid_reference")
        if reference is None:
            raise _Skip("missing_reference")
    top = key if key is not None and key in row else None
    return reference, top


def _row_to_record(row: Any, row_id: str, base_dir: Path, cfg: ReaderConfig) -> _Record:
    if not isinstance(row, dict):
        raise _Skip("malformed_json")
    prompt, messages, placeholders, chars = _prompt(row, cfg)
    if prompt is None or not prompt.strip():
        raise _Skip("empty_prompt")
    if cfg.max_prompt_chars is not None and chars > cfg.max_prompt_chars:
        raise _Skip("prompt_too_long")
    meta: Dict[str, Any] = {}
    reference, ref_key = _reference(row, cfg, meta)
    sources = [_image_source(v, base_dir) for v in _image_values(row, cfg)]
    if not sources and cfg.require_images:
        raise _Skip("missing_image")
    if placeholders and placeholders != len(sources):
        raise _Skip("image_count_mismatch")
    for src in sources:
        _check_image(src, cfg)
    data_source = _text(get_field(row, cfg.data_source_field))
    extra = get_field(row, cfg.extra_info_field)
    used = {cfg.prompt_field, ref_key, cfg.id_field, "meta"}
    used |= {cfg.image_field} if cfg.image_field else {"image", "images"}
    if data_source is not None:
        used.add(cfg.data_source_field)
    if isinstance(extra, dict):
        used.add(cfg.extra_info_field)
    for key, value in row.items():
        if key in used or isinstance(value, (bytes, bytearray, memoryview)):
            continue
        meta[key] = value
    if isinstance(row.get("meta"), dict):
        meta.update(row["meta"])
    record = _Record(row_id, prompt, reference, sources, meta, messages=messages, data_source=data_source,
                     extra_info=dict(extra) if isinstance(extra, dict) else {})
    if cfg.preload:
        try:
            record.images = [fit_image(load_image(s, cfg.image_mode), cfg) for s in sources]
        except Exception as exc:
            raise _Skip("unreadable_image") from exc
    return record


def _row_id(row: Any, fallback: str, cfg: ReaderConfig) -> str:
    if isinstance(row, dict):
        value = get_field(row, cfg.id_field)
        if value is not None and not isinstance(value, (bytes, bytearray)) and str(value).strip():
            return str(value)
    return fallback


class _Collector:
    """Turns raw rows into records, counting skips and duplicate ids."""

    def __init__(self, stats: DataStats, cfg: ReaderConfig, base_dir: Path, seen: set):
        self.stats, self.cfg, self.base_dir, self.seen = stats, cfg, base_dir, seen
        self.records: List[_Record] = []

    def add(self, row: Any, fallback_id: str) -> None:
        self.stats.rows_read += 1
        row_id = _row_id(row, fallback_id, self.cfg)
        try:
            if row_id in self.seen:
                raise _Skip("duplicate_id")
            record = _row_to_record(row, row_id, self.base_dir, self.cfg)
        except _Skip as skip:
            self.stats.skip(skip.reason, row_id)
            return
        self.seen.add(row_id)
        self.records.append(record)
        self.stats.rows_kept += 1

    def bad(self, reason: str, row_id: str) -> None:
        self.stats.rows_read += 1
        self.stats.skip(reason, row_id)


# ---------------------------------------------------------------------------------------------- formats
def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataFileError(f"data file {str(path)!r} does not exist")
    if not path.is_file():
        raise DataFileError(f"data file {str(path)!r} is not a file")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataFileError(f"cannot read data file {str(path)!r}: {exc}") from exc


def _is_json_array(path: Path) -> bool:
    if path.suffix != ".json":
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
    except OSError as exc:
        raise DataFileError(f"cannot read data file {str(path)!r}: {exc}") from exc
    return head[:1] == b"["


def _read_jsonl(path: Path, col: _Collector, id_prefix: str) -> None:
    _check_file(path)
    if _is_json_array(path):  # a .json file holding one array of rows
        try:
            rows = json.loads(_read_bytes(path).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataFileError(f"cannot parse JSON data file {str(path)!r}: {exc}") from exc
        for i, row in enumerate(rows):
            col.add(row, f"{id_prefix}:{i}")
        return
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DataFileError(f"cannot read data file {str(path)!r}: {exc}") from exc
    with f:  # streamed line by line: a large JSONL file (e.g. with base64 images) is never read whole
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fallback = f"{id_prefix}:{lineno}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                col.bad("non_utf8", fallback)
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError:
                col.bad("malformed_json", fallback)
                continue
            col.add(row, fallback)


def _require_pyarrow(what: str):
    try:
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"reading {what} needs pyarrow: pip install pyarrow") from exc


def _read_parquet(path: Path, col: _Collector, id_prefix: str) -> None:
    _check_file(path)
    _require_pyarrow(f"parquet file {str(path)!r}")
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
        i = 0
        for batch in pf.iter_batches(batch_size=512):
            for row in batch.to_pylist():
                col.add(row, f"{id_prefix}:{i}")
                i += 1
    except (OSError, ValueError) as exc:
        raise DataFileError(f"cannot read parquet data file {str(path)!r}: {exc}") from exc


def _arrow_batches(path: Path) -> Iterator[Any]:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as src:
            try:
                reader = pa.ipc.open_stream(src)
            except pa.ArrowInvalid:
                src.seek(0)
                reader = pa.ipc.open_file(src)
                for k in range(reader.num_record_batches):
                    yield reader.get_batch(k)
                return
            yield from reader
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataFileError(f"cannot read arrow data file {str(path)!r}: {exc}") from exc


def hf_disk_files(directory: PathLike, split: Optional[str] = None) -> List[Path]:
    """The Arrow files of a ``save_to_disk`` directory (a Dataset, or one split of a DatasetDict)."""
    d = Path(directory)
    if not d.exists():
        raise DataFileError(f"data directory {str(d)!r} does not exist")
    dict_file = d / "dataset_dict.json"
    if dict_file.is_file():
        try:
            splits = list(json.loads(dict_file.read_text(encoding="utf-8"))["splits"])
        except (OSError, ValueError, KeyError) as exc:
            raise DataFileError(f"cannot read {str(dict_file)!r}: {exc}") from exc
        if split is None:
            if "train" in splits:
                split = "train"
            elif len(splits) == 1:
                split = splits[0]
            else:
                raise ValueError(f"{str(d)!r} is a DatasetDict with splits {splits}: choose one with split=")
        if split not in splits:
            raise ValueError(f"{str(d)!r} has no split {split!r}: expected one of {splits}")
        d = d / split
    state_file = d / "state.json"
    if not state_file.is_file():
        raise DataFileError(
            f"{str(d)!r} is not a dataset saved with save_to_disk: no state.json (or dataset_dict.json)"
        )
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        files = [d / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataFileError(f"cannot read {str(state_file)!r}: {exc}") from exc
    for f in files:
        _check_file(f)
    return files


def _read_hf_disk(directory: Path, col: _Collector, id_prefix: str, split: Optional[str]) -> None:
    _require_pyarrow(f"HF datasets directory {str(directory)!r}")
    i = 0
    for f in hf_disk_files(directory, split):
        for batch in _arrow_batches(f):
            for row in batch.to_pylist():
                col.add(row, f"{id_prefix}:{i}")
                i += 1


# split names as HF ``datasets`` recognises them in a hub-style repository's file names (its default patterns)
HUB_SPLIT_KEYWORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                      "test": ("test", "testing", "eval", "evaluation")}
HUB_SUFFIXES = (".jsonl", ".ndjson") + PARQUET_SUFFIXES


def _hub_split(rel: str) -> Optional[str]:
    tokens = set(re.split(r"[/._\-\s0-9]+", rel.lower()))
    return next((name for name, words in HUB_SPLIT_KEYWORDS.items() if tokens.intersection(words)), None)


def hub_dir_files(directory: PathLike, split: Optional[str] = None) -> List[Path]:
    """The data files of one split of a hub-style dataset directory (a downloaded HF dataset repository:
    parquet / JSONL files such as ``data/train-00000-of-00002.parquet`` or ``test.jsonl``, hidden folders left
    out). A file's split is the keyword its path holds (``train``/``training``, ``validation``/``valid``/``dev``/
    ``val``, ``test``/``testing``/``eval``/``evaluation``, as ``datasets`` reads them); when no file names a split,
    all files are the one ``train`` split. ``split`` None picks ``train``, else the only split. A README's
    ``configs:`` section is not read."""
    d = Path(directory)
    files = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in HUB_SUFFIXES
                   and not any(part.startswith(".") for part in f.relative_to(d).parts))
    if not files:
        raise DataFileError(f"{str(d)!r} is neither a dataset saved with save_to_disk (no state.json or "
                            f"dataset_dict.json) nor a dataset directory holding {HUB_SUFFIXES} files")
    by_split: Dict[Optional[str], List[Path]] = {}
    for f in files:
        by_split.setdefault(_hub_split(f.relative_to(d).as_posix()), []).append(f)
    named = {k: v for k, v in by_split.items() if k is not None}
    if not named:
        named = {"train": files}
    elif None in by_split:
        logger.warning("%s: files that name no split are not read: %s", d,
                       ", ".join(f.relative_to(d).as_posix() for f in by_split[None]))
    if split is None:
        if "train" in named:
            split = "train"
        elif len(named) == 1:
            split = next(iter(named))
        else:
            raise ValueError(f"{str(d)!r} holds the splits {sorted(named)}: choose one with split=")
    if split not in named:
        raise ValueError(f"{str(d)!r} has no split {split!r}: expected one of {sorted(named)}")
    return named[split]


def _read_hub_dir(directory: Path, col: _Collector, id_prefix: str, split: Optional[str]) -> None:
    for f in hub_dir_files(directory, split):
        rel = f.relative_to(directory).as_posix()
        col.base_dir = f.parent
        if f.suffix.lower() in PARQUET_SUFFIXES:
            _read_parquet(f, col, f"{id_prefix}/{rel}")
        else:
            _read_jsonl(f, col, f"{id_prefix}/{rel}")


def detect_format(path: PathLike) -> str:
    """A directory: ``hf_disk`` (``save_to_disk``: it has ``state.json`` or ``dataset_dict.json``) or ``hub_dir``
    (parquet / JSONL files, see :func:`hub_dir_files`); a file: ``jsonl`` / ``parquet`` from the suffix; raises
    naming the path otherwise."""
    p = Path(path)
    if not p.exists():
        raise DataFileError(f"data file {str(p)!r} does not exist")
    if p.is_dir():
        return "hf_disk" if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file() else "hub_dir"
    suffix = p.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise ValueError(
        f"cannot tell the format of data file {str(p)!r}: expected a suffix in {JSONL_SUFFIXES + PARQUET_SUFFIXES} "
        "or a save_to_disk directory (or pass fmt=)"
    )


# ---------------------------------------------------------------------------------------------- dataset
class SampleDataset(Sequence[Sample]):
    """The samples read from one or more data files; ``dataset[i]`` decodes sample i's images.

    ``stats`` holds what was read, kept and skipped; ``ids`` the sample ids in order.
    """

    def __init__(self, records: List[_Record], stats: DataStats, image_mode: Optional[str] = "RGB",
                 config: Optional[ReaderConfig] = None):
        self._records = records
        self.stats = stats
        self.image_mode = image_mode
        self.config = config or ReaderConfig(image_mode=image_mode)  # oversize / pixel limits for fit_image
        self._failed: set = set()  # ids whose images failed to decode on access (counted once in stats)

    def __len__(self) -> int:
        return len(self._records)

    @property
    def ids(self) -> List[str]:
        return [r.id for r in self._records]

    def reference_sets(self) -> List[List[str]]:
        """Every sample's references (all of them where a row gives several), without decoding images."""
        out = []
        for r in self._records:
            refs = r.meta.get("all_references") or ([r.reference] if r.reference else [])
            out.append([str(x) for x in refs])
        return out

    def _sample(self, rec: _Record) -> Sample:
        if rec.images is not None:
            images = [im.copy() for im in rec.images]
        else:
            images = []
            for src in rec.sources:
                try:
                    images.append(fit_image(load_image(src, self.image_mode), self.config))
                except Exception as exc:
                    if rec.id not in self._failed:
                        self._failed.add(rec.id)
                        self.stats.skip("unreadable_image", rec.id)
                        self.stats.rows_kept -= 1
                    raise SampleLoadError(
                        f"sample {rec.id!r}: image {src.describe()!r} passed the read-time check but cannot be "
                        f"decoded ({exc}); read with verify_images='full' to skip such rows when reading"
                    ) from exc
        return Sample(id=rec.id, prompt=rec.prompt, reference=rec.reference, images=images, meta=dict(rec.meta),
                      messages=copy.deepcopy(rec.messages), data_source=rec.data_source,
                      extra_info=copy.deepcopy(rec.extra_info))

    @overload
    def __getitem__(self, i: int) -> Sample: ...

    @overload
    def __getitem__(self, i: slice) -> List[Sample]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._sample(r) for r in self._records[i]]
        return self._sample(self._records[i])

    def __repr__(self) -> str:
        return f"SampleDataset({len(self)} samples; {self.stats.summary()})"


def load_samples(paths: Union[PathLike, Sequence[PathLike]], fmt: Optional[str] = None,
                 config: Optional[ReaderConfig] = None, **overrides: Any) -> SampleDataset:
    """Read one or several data files (JSONL, parquet, a ``save_to_disk`` or hub-style directory) into a dataset.

    ``fmt`` forces the format (``jsonl`` | ``parquet`` | ``hf_disk`` | ``hub_dir``) instead of guessing it from
    the path;
    ``overrides`` are :class:`ReaderConfig` fields (``require_reference=True``, ``prompt_field="question"``...).
    Skipped rows are logged (one warning with ``DataStats.summary()``) and kept in ``dataset.stats``.
    """
    cfg = replace(config or ReaderConfig(), **overrides)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"load_samples fmt = {fmt!r}: expected one of {FORMATS}")
    path_list = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not path_list:
        raise ValueError("load_samples: no data files given")
    names = [Path(p).name for p in path_list]
    unique_names = len(set(names)) == len(names)
    total = DataStats()
    records: List[_Record] = []
    seen: set = set()
    for p, name in zip(path_list, names):
        path = Path(p)
        kind = fmt or detect_format(path)
        stats = DataStats(source=str(path))
        prefix = name if unique_names else str(path)
        col = _Collector(stats, cfg, path if kind == "hf_disk" else path.parent, seen)
        if kind == "jsonl":
            _read_jsonl(path, col, prefix)
        elif kind == "parquet":
            _read_parquet(path, col, prefix)
        elif kind == "hub_dir":
            _read_hub_dir(path, col, prefix, cfg.split)
        else:
            _read_hf_disk(path, col, prefix, cfg.split)
        if stats.total_skipped:
            logger.warning("skipped bad rows: %s", stats.summary())
        else:
            logger.info("%s", stats.summary())
        total.merge(stats)
        records.extend(col.records)
    return SampleDataset(records, total, cfg.image_mode, cfg)


def samples_from_rows(rows: Sequence[Dict[str, Any]], base_dir: PathLike = ".", source: str = "<rows>",
                      config: Optional[ReaderConfig] = None, **overrides: Any) -> SampleDataset:
    """Rows already in memory (dicts as a JSONL line would hold) -> dataset, with the same checks."""
    cfg = replace(config or ReaderConfig(), **overrides)
    stats = DataStats(source=source)
    col = _Collector(stats, cfg, Path(base_dir), set())
    for i, row in enumerate(rows):
        col.add(row, f"{source}:{i}")
    return SampleDataset(col.records, stats, cfg.image_mode, cfg)


def image_to_png_bytes(image: Image.Image) -> bytes:
    """PNG encoding of an image (handy for writing parquet / HF-style ``{"bytes": ...}`` rows)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


__all__ = [
    "DataFileError", "SampleLoadError", "ReaderConfig", "ImageSource", "SampleDataset", "load_samples",
    "samples_from_rows", "detect_format", "hf_disk_files", "hub_dir_files", "get_field", "fit_image",
    "REFERENCE_FIELDS", "load_image", "image_to_png_bytes", "FORMATS",
]
