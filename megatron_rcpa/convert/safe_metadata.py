"""Reading ``torch.distributed.checkpoint`` metadata without executing it.

A dist checkpoint's ``.metadata`` file is a pickle, and torch's ``FileSystemReader.read_metadata`` (which
megatron's ``dist_checkpointing.load`` goes through) unpickles it with plain ``pickle.load``: a planted file
runs arbitrary code. Here it is read by :class:`RestrictedMetadataUnpickler`, which builds only the classes
that such a file really holds and refuses anything else, naming the file and the class::

    with restricted_metadata():                      # every DCP metadata read inside uses the allow-list
        state = dist_checkpointing.load(sharded_sd, ckpt_dir)

    check_dcp_metadata(ckpt_dir)                     # read <ckpt_dir>/.metadata up front (ConversionError)

The allow-list (:data:`ALLOWED_GLOBALS`) was taken from the ``.metadata`` files that this project's saves
write (policy ``model/`` and trainer ``optimizer/``, TP=1 and TP=2, megatron-core 0.16.1 and 0.19.2, torch
2.13): the ``torch.distributed.checkpoint`` metadata and save-plan classes (megatron caches its global save
plan in the file), ``torch.Size``, torch dtypes / layouts / memory formats and plain containers. No megatron
class occurs in them. Everything else - ``os.system``, ``builtins.eval``, any other callable - is refused
with :class:`UnsafeCheckpointError` before it is called.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import threading
from typing import Any, BinaryIO, Dict, FrozenSet, Iterator

from megatron_rcpa.convert.errors import ConversionError

__all__ = [
    "ALLOWED_GLOBALS",
    "RestrictedMetadataUnpickler",
    "UnsafeCheckpointError",
    "check_dcp_metadata",
    "load_metadata_file",
    "restricted_metadata",
]

DCP_METADATA_FILE = ".metadata"

#: module -> names a checkpoint ``.metadata`` may reference. torch dtypes / layouts / memory formats
#: (``torch.float32``, ...) are admitted by type, see :meth:`RestrictedMetadataUnpickler.find_class`.
ALLOWED_GLOBALS: Dict[str, FrozenSet[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    }),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.distributed.checkpoint.planner": frozenset({"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"}),
    "torch": frozenset({"Size"}),
    "torch.serialization": frozenset({"_get_layout"}),  # layout by name, from a fixed table
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset", "slice"}),
    "pathlib": frozenset({"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}),
}


class UnsafeCheckpointError(ConversionError):
    """A checkpoint metadata file asks for a class or function outside the allow-list (refused, never run)."""


class RestrictedMetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS` (and torch dtypes/layouts/memory formats)."""

    def __init__(self, file: BinaryIO, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in ALLOWED_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and "." not in name:
            import torch

            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise UnsafeCheckpointError(
            f"refusing to load {self.source}: it asks for {module}.{name}, which is not a checkpoint-metadata "
            f"class (a dist checkpoint's .metadata may hold only torch.distributed.checkpoint metadata; this file "
            f"was not written by a checkpoint save, or was altered)")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"refusing to load {self.source}: it holds a persistent reference {pid!r}, "
                                    "which checkpoint metadata never does")


def _source_of(file: Any) -> str:
    name = getattr(file, "name", None)
    return os.path.abspath(name) if isinstance(name, (str, bytes, os.PathLike)) else repr(file)


def restricted_load(file: BinaryIO, source: str | None = None) -> Any:
    """Unpickle checkpoint metadata from an open binary file through the allow-list.

    UnsafeCheckpointError for a class outside it; ConversionError for a file that is not a pickle."""
    source = source or _source_of(file)
    try:
        return RestrictedMetadataUnpickler(file, source).load()
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError,
            KeyError) as exc:
        raise ConversionError(f"cannot read checkpoint metadata {source}: {type(exc).__name__}: {exc} "
                              "(truncated or corrupted)") from exc


def load_metadata_file(path: str) -> Any:
    """The object in a ``.metadata`` file, read through the allow-list (ConversionError naming the file)."""
    try:
        with open(path, "rb") as f:
            return restricted_load(f, os.path.abspath(path))
    except FileNotFoundError:
        raise ConversionError(f"{os.path.abspath(path)} not found: not a complete dist checkpoint") from None


def check_dcp_metadata(directory: str) -> Any:
    """Read ``<directory>/.metadata`` through the allow-list before any loader touches it; returns it."""
    return load_metadata_file(os.path.join(directory, DCP_METADATA_FILE))


class _RestrictedPickleModule:
    """Stands in for the ``pickle`` module inside ``torch.distributed.checkpoint.filesystem``: ``load`` /
    ``loads`` go through the allow-list, everything else (``dump`` for saves) is the real pickle."""

    def load(self, file: BinaryIO, *args: Any, **kwargs: Any) -> Any:
        return restricted_load(file)

    def loads(self, data: bytes, *args: Any, **kwargs: Any) -> Any:
        return restricted_load(io.BytesIO(data), "<checkpoint metadata bytes>")

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)


_RESTRICTED_PICKLE = _RestrictedPickleModule()
_lock = threading.RLock()
_depth = 0


@contextlib.contextmanager
def restricted_metadata() -> Iterator[None]:
    """Make every ``torch.distributed.checkpoint`` metadata read inside the block use the allow-list.

    It swaps the ``pickle`` that ``torch.distributed.checkpoint.filesystem`` reads ``.metadata`` with (the
    module megatron's readers, ``CachedMetadataFileSystemReader`` included, go through) for one whose
    ``load`` is restricted; saves are unaffected. Re-entrant and thread-safe (a counter; the real module is
    put back when the outermost block exits). Raises RuntimeError if torch no longer reads metadata that way
    (so that a torch upgrade cannot silently drop the protection).
    """
    global _depth
    from torch.distributed.checkpoint import filesystem

    with _lock:
        if _depth == 0:
            if getattr(filesystem, "pickle", None) is not pickle:
                raise RuntimeError("torch.distributed.checkpoint.filesystem no longer reads .metadata through its "
                                   "module-level `pickle`; megatron_rcpa.convert.safe_metadata must be updated "
                                   "for this torch version before checkpoints can be loaded safely")
            filesystem.pickle = _RESTRICTED_PICKLE
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                filesystem.pickle = pickle
