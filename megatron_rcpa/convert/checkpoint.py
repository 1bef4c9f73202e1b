"""Policy checkpoints: megatron ``dist_checkpointing`` + a metadata file + the HF tokenizer/processor files.

A checkpoint directory::

    <dir>/rcpa_checkpoint.json   metadata (CheckpointMetadata): family, the HF config.json, dtype, vocab sizes
    <dir>/model/                 megatron dist_checkpointing (global tensors: loads at any TP/PP)
    <dir>/hf_assets/             tokenizer / processor / chat-template / generation-config files, verbatim
    <dir>/rcpa_manifest.json     size and sha256 of every file above (convert/manifest.py)

Loading reads the dist checkpoint's pickled ``.metadata`` only through an allow-list of metadata classes
(convert/safe_metadata.py: a planted pickle is refused, never run) and checks every file's size against the
manifest (its checksums too with ``checksums=True``).

It is written aside (``<dir>.incomplete``) and renamed into place only when complete, so a failed or
interrupted save never leaves something that looks like a valid checkpoint; :func:`read_metadata` refuses a
directory without the metadata file.

Collective API (every rank of the job calls it; megatron ``parallel_state`` initialised)::

    save_checkpoint(policy, "ckpt/", metadata)                   # metadata: CheckpointMetadata
    metadata = load_checkpoint(policy, "ckpt/")                  # into a policy built at any TP/PP
    policy, metadata = build_policy_from_checkpoint("ckpt/")    # build this rank's stage + load
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

import torch

from megatron_rcpa.convert.errors import ConversionError
from megatron_rcpa.convert.hf_io import check_asset_name
from megatron_rcpa.convert.manifest import check_manifest, write_manifest
from megatron_rcpa.convert.safe_metadata import check_dcp_metadata, restricted_metadata

__all__ = [
    "ASSETS_DIR",
    "METADATA_FILE",
    "MODEL_DIR",
    "CheckpointMetadata",
    "build_policy_from_checkpoint",
    "is_checkpoint",
    "load_checkpoint",
    "read_metadata",
    "refuse_overlap",
    "save_checkpoint",
    "save_sharded",
    "unwrap_model",
]

FORMAT_VERSION = 1
METADATA_FILE = "rcpa_checkpoint.json"
MODEL_DIR = "model"
ASSETS_DIR = "hf_assets"
INCOMPLETE_SUFFIX = ".incomplete"


@dataclasses.dataclass
class CheckpointMetadata:
    """What a checkpoint is, besides its tensors."""

    family: str  # a key of megatron_rcpa.convert.families.FAMILIES
    hf_config: Dict[str, Any]  # the HF config.json, as a dict
    dtype: str  # dtype of the stored tensors: "fp32" | "bf16" | "fp16"
    vocab_size: int
    padded_vocab_size: int
    source_dtype: Optional[str] = None  # dtype of the HF checkpoint it was converted from (export default)
    hf_tensor_dtypes: Dict[str, str] = dataclasses.field(default_factory=dict)  # HF tensors not in source_dtype
    assets: List[str] = dataclasses.field(default_factory=list)  # file names under hf_assets/
    megatron_core_version: str = ""
    format_version: int = FORMAT_VERSION
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)  # free-form (iteration, provenance, ...)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = "<dict>") -> CheckpointMetadata:
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ConversionError(f"{source}: missing key(s) {missing}")
        assets = data.get("assets", [])
        if not isinstance(assets, list):
            raise ConversionError(f"{source}: 'assets' must be a list of file names, not {assets!r}")
        for name in assets:
            check_asset_name(name, source)
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ConversionError(f"{source}: format_version={version} is newer than this code "
                                  f"({FORMAT_VERSION})")
        return cls(**{k: v for k, v in data.items() if k in names})


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers (``.module`` chains)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def is_checkpoint(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, METADATA_FILE)) and os.path.isdir(os.path.join(directory,
                                                                                                  MODEL_DIR))


def read_metadata(directory: str) -> CheckpointMetadata:
    """The metadata of a checkpoint directory; ConversionError if it is not a complete checkpoint."""
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.isdir(directory):
        raise ConversionError(f"checkpoint directory {directory!r} does not exist")
    if not os.path.isfile(path):
        hint = " (an interrupted save?)" if directory.rstrip("/").endswith(INCOMPLETE_SUFFIX) else ""
        raise ConversionError(f"{directory!r} is not a megatron_rcpa checkpoint: {METADATA_FILE} not found{hint}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    meta = CheckpointMetadata.from_dict(data, source=path)
    if not os.path.isdir(os.path.join(directory, MODEL_DIR)):
        raise ConversionError(f"{directory!r}: {MODEL_DIR}/ (the dist_checkpointing tensors) is missing")
    return meta


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _megatron_version() -> str:
    try:
        from importlib.metadata import version

        return version("megatron-core")
    except Exception:  # noqa: BLE001
        return ""


def save_sharded(sharded_state_dict: Any, directory: str, sharded_strategy: Any = None) -> None:
    """Write a megatron sharded state dict (e.g. an optimizer's) to ``directory`` synchronously; collective.

    The public save the trainer uses next to :func:`save_checkpoint`; see
    :func:`megatron_rcpa.runtime.checkpoint.save_sharded` (it refuses daemonic processes, which megatron's
    writer cannot run in).
    """
    from megatron_rcpa.runtime.checkpoint import save_sharded as _save_sharded

    _save_sharded(sharded_state_dict, directory, sharded_strategy)


def save_checkpoint(model: torch.nn.Module, directory: str, metadata: CheckpointMetadata, *,
                    assets_from: Optional[str] = None, overwrite: bool = False, sharded_strategy: Any = None) -> None:
    """Save ``model`` (this rank's stage of a policy) as a checkpoint. Collective over all ranks.

    ``assets_from``: a directory whose tokenizer/processor files are copied into ``hf_assets/``
    (an HF directory, or ``<checkpoint>/hf_assets``). Refuses an existing ``directory`` unless ``overwrite``.
    ``sharded_strategy``: megatron's save strategy (the converter's writes a meta-device policy's tensors as it
    makes them: :class:`~megatron_rcpa.convert.streaming.LazyTorchDistSave`).
    """
    directory = os.path.abspath(directory.rstrip("/"))
    if os.path.exists(directory) and not overwrite:
        raise ConversionError(f"{directory!r} already exists (pass overwrite=True / --overwrite to replace it)")
    tmp = directory + INCOMPLETE_SUFFIX
    if _rank() == 0:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(os.path.join(tmp, MODEL_DIR))
    _barrier()
    policy = unwrap_model(model)
    save_sharded(policy.sharded_state_dict(), os.path.join(tmp, MODEL_DIR), sharded_strategy)
    _barrier()
    if _rank() == 0:
        from megatron_rcpa.convert.hf_io import copy_assets

        metadata = dataclasses.replace(metadata)
        if assets_from is not None:
            metadata.assets = copy_assets(assets_from, os.path.join(tmp, ASSETS_DIR))
        metadata.megatron_core_version = metadata.megatron_core_version or _megatron_version()
        with open(os.path.join(tmp, METADATA_FILE), "w") as f:
            f.write(metadata.to_json())
        write_manifest(tmp)
        old = None
        if os.path.exists(directory):
            old = directory + ".old"
            if os.path.exists(old):
                shutil.rmtree(old)
            os.rename(directory, old)
        os.rename(tmp, directory)
        if old is not None:
            shutil.rmtree(old)
    _barrier()


def load_checkpoint(model: torch.nn.Module, directory: str, *, strict: bool = True,
                    checksums: bool = False) -> CheckpointMetadata:
    """Load a checkpoint into ``model`` (this rank's stage, any TP/PP). Collective over all ranks.

    Every file's size is checked against the manifest (sha256 too with ``checksums``); the dist checkpoint's
    ``.metadata`` is read only through the allow-list of :mod:`~megatron_rcpa.convert.safe_metadata`."""
    from megatron.core import dist_checkpointing

    meta = read_metadata(directory)
    policy = unwrap_model(model)
    padded = getattr(policy, "padded_vocab_size", None)
    if padded is not None and padded != meta.padded_vocab_size:
        raise ConversionError(f"{directory!r} holds a padded vocabulary of {meta.padded_vocab_size} rows but the "
                              f"model was built with padded_vocab_size={padded}; build it with the metadata's value")
    check_manifest(directory, checksums=checksums)
    model_dir = os.path.join(directory, MODEL_DIR)
    check_dcp_metadata(model_dir)  # a clean error on every rank before megatron reads it (restricted too)
    with restricted_metadata():
        state = dist_checkpointing.load(policy.sharded_state_dict(), model_dir)
    if isinstance(state, tuple):
        state = state[0]
    policy.load_state_dict(state, strict=strict)
    return meta


def build_policy_from_checkpoint(directory: str, *, load: bool = True, params_dtype: Any = None,
                                 checksums: bool = False,
                                 **build_kwargs: Any) -> Tuple[torch.nn.Module, CheckpointMetadata]:
    """Build this rank's policy stage for the checkpoint's family (current TP/PP) and load its weights.

    ``params_dtype`` defaults to the stored dtype; ``build_kwargs`` go to the family's builder
    (e.g. ``config_overrides``, ``vision_attn_implementation``). The load is :func:`load_checkpoint`'s
    (manifest sizes, sha256 with ``checksums``, metadata through the allow-list).
    """
    from megatron_rcpa.convert.families import family_by_name

    meta = read_metadata(directory)
    family = family_by_name(meta.family)
    policy = family.build_policy(meta.hf_config, params_dtype=params_dtype or meta.dtype,
                                 padded_vocab_size=meta.padded_vocab_size, perform_initialization=not load,
                                 **build_kwargs)
    if load:
        load_checkpoint(policy, directory, checksums=checksums)
    return policy, meta


def refuse_overlap(source: str, out: str, *, source_what: str = "input") -> None:
    """ConversionError when writing ``out`` (or its ``.incomplete`` / ``.old`` siblings) could delete or
    overwrite ``source``: the same directory, one inside the other (symlinks resolved)."""
    src = os.path.realpath(source)
    for target in (out, out.rstrip("/") + INCOMPLETE_SUFFIX, out.rstrip("/") + ".old"):
        dst = os.path.realpath(target)
        if dst == src:
            problem = "is"
        elif dst.startswith(src.rstrip(os.sep) + os.sep):
            problem = "is inside"
        elif src.startswith(dst.rstrip(os.sep) + os.sep):
            problem = "contains"
        else:
            continue
        raise ConversionError(f"output {out!r} {problem} the {source_what} {source!r} (resolved: {dst} vs {src}); "
                              "writing it would destroy the input: choose an output outside the input")
