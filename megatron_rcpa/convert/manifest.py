"""Per-file sizes and sha256 checksums of a written checkpoint, so that damaged bytes are found before use.

:func:`write_manifest` records every regular file under a directory in ``rcpa_manifest.json`` (written last,
by the saver, before the directory is renamed into place); :func:`check_manifest` compares the files with
it: sizes always (a stat per file: a truncated or replaced file), sha256 when asked (reads every byte: a
flipped bit). Written for policy checkpoints (:func:`~megatron_rcpa.convert.checkpoint.save_checkpoint`) and
HF exports (:func:`~megatron_rcpa.convert.megatron_to_hf.convert_megatron_to_hf`); any other directory (a
trainer's ``optimizer/``) can use the same two calls. A directory written before manifests existed loads
with a warning saying that nothing was checked.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import warnings
from typing import Dict, Optional

from megatron_rcpa.convert.errors import ConversionError

__all__ = ["MANIFEST_FILE", "UncheckedCheckpointWarning", "check_manifest", "file_sha256", "write_manifest"]

MANIFEST_FILE = "rcpa_manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 8 << 20
_warned: set = set()


class UncheckedCheckpointWarning(UserWarning):
    """A directory without a manifest is loaded unchecked (the tools always show this warning)."""


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: str) -> Dict[str, str]:
    """relative path -> absolute path of every file under ``directory`` (the manifest itself excluded)."""
    out = {}
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory).replace(os.sep, "/")
            if rel == MANIFEST_FILE:
                continue
            if os.path.islink(path):
                raise ConversionError(f"{path} is a symbolic link; a checkpoint holds only regular files")
            out[rel] = path
    return out


def _hash_all(paths: Dict[str, str]) -> Dict[str, str]:
    workers = max(1, min(8, os.cpu_count() or 1, len(paths)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # hashlib releases the GIL
        return dict(zip(paths, pool.map(file_sha256, paths.values())))


def write_manifest(directory: str) -> str:
    """Record size and sha256 of every file under ``directory`` in ``<directory>/rcpa_manifest.json``."""
    paths = _files(directory)
    digests = _hash_all(paths)
    entries = {rel: {"size": os.path.getsize(path), "sha256": digests[rel]} for rel, path in paths.items()}
    out = os.path.join(directory, MANIFEST_FILE)
    with open(out, "w") as f:
        json.dump({"version": MANIFEST_VERSION, "files": entries}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    return out


def read_manifest(directory: str) -> Optional[Dict[str, Dict[str, object]]]:
    """The manifest's ``files`` table, or None when the directory has none."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        files = data["files"]
        if not isinstance(files, dict) or not all(isinstance(e, dict) and isinstance(e.get("size"), int)
                                                  and isinstance(e.get("sha256"), str) for e in files.values()):
            raise ValueError("every entry of 'files' must be {'size': int, 'sha256': str}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConversionError(f"cannot read the manifest {path}: {exc}") from exc
    for rel in files:
        parts = rel.split("/")
        if os.path.isabs(rel) or any(p in ("", ".", "..") for p in parts):
            raise ConversionError(f"{path} lists {rel!r}, which is not a path inside {directory!r}")
    return files


def check_manifest(directory: str, *, checksums: bool = False, required: bool = False,
                   what: str = "checkpoint") -> bool:
    """Compare the files under ``directory`` with its manifest: sizes, and sha256 when ``checksums``.

    ConversionError naming the first file that is missing, of another size or another checksum. Returns False
    (with a warning, or ConversionError when ``required``) when the directory has no manifest.
    """
    files = read_manifest(directory)
    if files is None:
        message = (f"{directory!r} has no {MANIFEST_FILE} (written before manifests existed?): its files' sizes "
                   "and checksums cannot be checked")
        if required:
            raise ConversionError(message)
        key = os.path.realpath(directory)
        if key not in _warned:  # once per directory and process (a tool checks, then loads)
            _warned.add(key)
            warnings.warn(f"{what} {message}; loading it unchecked", UncheckedCheckpointWarning, stacklevel=2)
        return False
    for rel, entry in sorted(files.items()):
        path = os.path.join(directory, *rel.split("/"))
        if os.path.islink(path):
            raise ConversionError(f"{path} is a symbolic link; the {what} was written with a regular file there")
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise ConversionError(f"{path} is missing: the {what}'s manifest lists it ({entry['size']} bytes)") \
                from None
        if size != entry["size"]:
            raise ConversionError(f"{path} has {size} bytes but the {what} was written with {entry['size']} "
                                  "(truncated or replaced)")
    if checksums:
        digests = _hash_all({rel: os.path.join(directory, *rel.split("/")) for rel in sorted(files)})
        for rel in sorted(files):
            if digests[rel] != files[rel]["sha256"]:
                raise ConversionError(f"{os.path.join(directory, *rel.split('/'))}: sha256 {digests[rel][:16]}... "
                                      f"differs from the manifest's {str(files[rel]['sha256'])[:16]}... (the "
                                      "file is corrupted)")
    return True
