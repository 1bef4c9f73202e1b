"""Reading and writing HF checkpoint directories: config, safetensors (single / sharded with an index), and
the tokenizer / processor files that travel with a checkpoint.

:class:`HFCheckpointReader` reads tensors lazily (one ``safe_open`` per file, a tensor at a time) and
accepts both on-disk names and transformers-5 in-memory names (mapped to on-disk names through the
family's aliases). :func:`write_safetensors_shards` writes ``model-0000i-of-0000N.safetensors`` plus
``model.safetensors.index.json`` the way ``save_pretrained`` does.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from megatron_rcpa.convert.errors import ConversionError

__all__ = [
    "ASSET_PATTERNS",
    "HFCheckpointReader",
    "check_asset_name",
    "check_no_remote_code",
    "copy_asset",
    "copy_assets",
    "load_hf_config",
    "read_config_dict",
    "write_safetensors_shards",
]

INDEX_FILE = "model.safetensors.index.json"
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
SINGLE_FILE = "model.safetensors"

#: Files copied verbatim between an HF directory and a converted checkpoint (tokenizer, processor,
#: chat template, generation config). Matched with fnmatch against file names in the directory's top level.
ASSET_PATTERNS = (
    "tokenizer*.json", "tokenizer.model", "*.tiktoken", "vocab.json", "vocab.txt", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json", "chat_template*", "generation_config.json", "*.model",
)


def check_no_remote_code(config: Dict[str, Any], source: str) -> None:
    """Refuse a config that asks transformers to run code shipped with the checkpoint (``auto_map``)."""
    found = [key for key, sub in [("", config)] + [(k + ".", v) for k, v in config.items() if isinstance(v, dict)]
             if "auto_map" in sub]
    if found:
        raise ConversionError(f"{source} has '{found[0]}auto_map' (model code shipped with the checkpoint); "
                              "megatron_rcpa never runs a checkpoint's code (trust_remote_code=False): only "
                              "architectures built into transformers are supported")


def read_config_dict(hf_dir: str) -> Dict[str, Any]:
    """The raw ``config.json`` of an HF directory, with a clear error when it is missing or not JSON, or
    when it names remote code (``auto_map``)."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"HF directory {hf_dir!r} does not exist")
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path} not found: not an HF model directory") from None
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    check_no_remote_code(config, path)
    return config


def load_hf_config(hf_dir_or_dict: Any):
    """An HF config object from a directory (``AutoConfig``, offline, never remote code) or from a config
    dict; a config with ``auto_map`` is refused."""
    from transformers import AutoConfig

    if isinstance(hf_dir_or_dict, dict):
        check_no_remote_code(hf_dir_or_dict, "the checkpoint's HF config")
        d = dict(hf_dir_or_dict)
        model_type = d.pop("model_type", None)
        if model_type is None:
            raise ConversionError("config has no 'model_type'")
        try:
            return AutoConfig.for_model(model_type, **d)
        except (ValueError, KeyError, TypeError) as exc:
            raise ConversionError(f"cannot build an HF config of model_type={model_type!r}: {exc}") from exc
    read_config_dict(hf_dir_or_dict)
    try:
        return AutoConfig.from_pretrained(hf_dir_or_dict, local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise ConversionError(f"cannot load the HF config in {hf_dir_or_dict!r}: {exc}") from exc


def normalize_name(name: str, aliases: Sequence[Tuple[str, str]]) -> str:
    """Map an in-memory name onto the on-disk name through ``(in_memory_prefix, on_disk_prefix)`` pairs."""
    for in_memory, on_disk in aliases:
        if name.startswith(in_memory):
            return on_disk + name[len(in_memory):]
    return name


class HFCheckpointReader:
    """Lazy access to the tensors of an HF safetensors checkpoint, by canonical (on-disk) name."""

    def __init__(self, hf_dir: str, aliases: Sequence[Tuple[str, str]] = ()) -> None:
        self.hf_dir = hf_dir
        self.aliases = tuple(aliases)
        self._handles: Dict[str, Any] = {}
        self._headers: Dict[str, Tuple[Dict[str, Any], int]] = {}
        self._where: Dict[str, Tuple[str, str]] = {}  # canonical name -> (file, stored name)
        for file, stored in self._list_tensors():
            name = normalize_name(stored, self.aliases)
            if name in self._where:
                other = self._where[name]
                raise ConversionError(f"tensor {name!r} appears twice: as {other[1]!r} in {other[0]} and as "
                                      f"{stored!r} in {file}")
            self._where[name] = (file, stored)

    def _list_tensors(self) -> List[Tuple[str, str]]:
        if not os.path.isdir(self.hf_dir):
            raise ConversionError(f"HF directory {self.hf_dir!r} does not exist")
        index_path = os.path.join(self.hf_dir, INDEX_FILE)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConversionError(f"cannot read {index_path}: {exc}") from exc
            for file in sorted(set(weight_map.values())):
                if not os.path.exists(os.path.join(self.hf_dir, file)):
                    raise ConversionError(f"{index_path} lists {file!r}, which does not exist")
            listed = [(file, name) for name, file in weight_map.items()]
            for file in sorted(set(weight_map.values())):  # the index must agree with the files
                actual = set(self._keys(file))
                claimed = {name for f, name in listed if f == file}
                if claimed - actual:
                    missing = sorted(claimed - actual)[:5]
                    raise ConversionError(f"{index_path} places {missing} in {file}, which does not hold them")
            return listed
        files = sorted(f for f in os.listdir(self.hf_dir) if f.endswith(".safetensors"))
        if not files:
            others = sorted(f for f in os.listdir(self.hf_dir) if f.endswith((".bin", ".pt", ".pth")))
            hint = f" (found {others}: only safetensors are supported)" if others else ""
            raise ConversionError(f"no *.safetensors files in {self.hf_dir!r}{hint}")
        return [(file, name) for file in files for name in self._keys(file)]

    def _handle(self, file: str):
        if file not in self._handles:
            from safetensors import safe_open

            path = os.path.join(self.hf_dir, file)
            try:
                self._handles[file] = safe_open(path, framework="pt")
            except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
                raise ConversionError(f"cannot read safetensors file {path}: {exc}") from exc
        return self._handles[file]

    def _keys(self, file: str) -> List[str]:
        return list(self._handle(file).keys())

    def names(self) -> List[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> Tuple[int, ...]:
        file, stored = self._locate(name)
        return tuple(self._handle(file).get_slice(stored).get_shape())

    def dtype(self, name: str) -> str:
        file, stored = self._locate(name)
        return str(self._handle(file).get_slice(stored).get_dtype())

    def get(self, name: str) -> torch.Tensor:
        """The tensor, read from the file into memory of its own (``pread`` of its bytes, not a memory map:
        the file's pages never count towards this process's resident memory, so converting a checkpoint
        holds one tensor of it at a time, not every page read so far)."""
        file, stored = self._locate(name)
        path = os.path.join(self.hf_dir, file)
        try:
            entry, start = self._entry(file, stored)
            dtype = _ST_DTYPES.get(entry["dtype"])
            if dtype is None:  # a dtype torch.frombuffer cannot view: the library's reader
                return self._handle(file).get_tensor(stored)
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = [int(d) for d in entry["shape"]]
            if end == begin:
                return torch.empty(shape, dtype=dtype)
            buf = bytearray(end - begin)
            with open(path, "rb") as f:
                f.seek(start + begin)
                if f.readinto(buf) != end - begin:
                    raise ConversionError(f"{path} ends inside tensor {stored!r} (truncated file)")
            return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)
        except ConversionError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ConversionError(f"cannot read tensor {stored!r} from {path}: {exc}") from exc

    def _entry(self, file: str, stored: str) -> Tuple[Dict[str, Any], int]:
        """(header entry of ``stored``, offset of the file's data) from the safetensors header (a little-endian
        u64 length, then that much JSON); the header was already validated by ``safe_open``."""
        if file not in self._headers:
            import struct

            path = os.path.join(self.hf_dir, file)
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                self._headers[file] = (json.loads(f.read(n)), 8 + n)
        header, start = self._headers[file]
        return header[stored], start

    def _locate(self, name: str) -> Tuple[str, str]:
        try:
            return self._where[name]
        except KeyError:
            raise ConversionError(f"tensor {name!r} is missing from the HF checkpoint in {self.hf_dir!r}") from None

    def close(self) -> None:
        self._handles.clear()
        self._headers.clear()


def write_safetensors_shards(tensors_by_shard: Sequence[Dict[str, torch.Tensor]], out_dir: str,
                             *, total_size: Optional[int] = None) -> List[str]:
    """Write one safetensors file per dict (``model-0000i-of-0000N``) and the index; returns the file names.

    A single dict is written as ``model.safetensors`` with no index, as ``save_pretrained`` does.
    """
    from safetensors.torch import save_file

    shards = [s for s in tensors_by_shard if s]
    if len(shards) == 1:
        save_file({k: v.contiguous() for k, v in shards[0].items()}, os.path.join(out_dir, SINGLE_FILE),
                  metadata={"format": "pt"})
        return [SINGLE_FILE]
    names, weight_map = [], {}
    size = 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, os.path.join(out_dir, file),
                  metadata={"format": "pt"})
        names.append(file)
        for key, tensor in shard.items():
            weight_map[key] = file
            size += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total_size if total_size is not None else size},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    return names


def check_asset_name(name: Any, source: str) -> str:
    """An asset is a plain file name (no directory part, not ``.``/``..``): it cannot point outside its dir."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.basename(name) != name):
        raise ConversionError(f"{source}: asset {name!r} is not a plain file name (assets are files directly "
                              "inside the asset directory)")
    return name


def list_assets(src_dir: str, patterns: Iterable[str] = ASSET_PATTERNS) -> List[str]:
    import fnmatch

    if not os.path.isdir(src_dir):
        return []
    return sorted(f for f in os.listdir(src_dir)
                  if (os.path.isfile(os.path.join(src_dir, f)) or os.path.islink(os.path.join(src_dir, f)))
                  and any(fnmatch.fnmatch(f, p) for p in patterns) and not f.endswith(".safetensors"))


def copy_asset(src_dir: str, name: str, dst_dir: str) -> None:
    """Copy one asset file; refuses a name that is not a plain file name and a symbolic link (whose target,
    anywhere on the machine, would otherwise be copied)."""
    check_asset_name(name, src_dir)
    src = os.path.join(src_dir, name)
    if os.path.islink(src):
        raise ConversionError(f"asset {src} is a symbolic link (to {os.readlink(src)!r}); assets are copied only "
                              "from regular files (copy the directory with `cp -rL`, or download it with "
                              "`hf download --local-dir`)")
    if not os.path.isfile(src):
        raise ConversionError(f"asset {src} is missing or not a regular file")
    shutil.copyfile(src, os.path.join(dst_dir, name), follow_symlinks=False)
    shutil.copystat(src, os.path.join(dst_dir, name), follow_symlinks=False)


def copy_assets(src_dir: str, dst_dir: str, patterns: Iterable[str] = ASSET_PATTERNS) -> List[str]:
    """Copy the tokenizer / processor / generation-config files of ``src_dir`` into ``dst_dir`` (regular
    files only: a symbolic link is refused; a JSON file with ``auto_map`` - remote code - too)."""
    files = list_assets(src_dir, patterns)
    for f in files:  # tokenizer / processor code shipped with the checkpoint is refused, like a model's
        if f.endswith(".json") and not os.path.islink(os.path.join(src_dir, f)):
            try:
                with open(os.path.join(src_dir, f)) as fh:
                    data = json.load(fh)
            except (OSError, ValueError) as exc:
                raise ConversionError(f"cannot read {os.path.join(src_dir, f)}: {exc}") from exc
            if isinstance(data, dict):
                check_no_remote_code(data, os.path.join(src_dir, f))
    os.makedirs(dst_dir, exist_ok=True)
    for f in files:
        copy_asset(src_dir, f, dst_dir)
    return files
