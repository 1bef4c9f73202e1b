"""HF directories in and out of a training run.

In: ``model.checkpoint`` (and ``model.reference_checkpoint``) may name an HF directory (``config.json`` +
safetensors, no ``rcpa_checkpoint.json``). :func:`prepare_checkpoints` converts it once into
``<run.output_dir>/converted/<dir name>`` (a megatron policy checkpoint at the HF tensors' dtype) and returns
the config with the path replaced. A later run or resume reuses the conversion when the source's files (names,
sizes, mtimes) are those recorded in the completion marker ``converted/<dir name>.json`` and the converted
files match their manifest. Only global rank 0 (``RANK``, or the process group's rank) converts, in a spawned
1x1 worker (in this process when it is the only one and no process group exists), so megatron's parallel
state of the run is never touched; every other rank waits for the marker (``wait_timeout``), and fails with
the converter's error when rank 0 records a failure.

Out: ``run.export_hf`` writes ``<run.output_dir>/hf_export/`` at the end of training (:func:`export_policy`,
collective): the policy in memory (equal to the final checkpoint's ``policy/``) goes through the converter's
own export (TP gathered on the first TP rank of every stage, data-parallel rank 0 only), sharded at
``run.export_max_shard_size`` with ``model.safetensors.index.json`` when there is more than one shard, plus
``config.json``, the tokenizer / processor files and a manifest. A stop request's save does not export (a
preempted job has no time to spare); the run exports when it reaches ``run.steps`` after its resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Dict, Optional

import torch

from megatron_rcpa.convert.checkpoint import METADATA_FILE, is_checkpoint
from megatron_rcpa.convert.errors import ConversionError

__all__ = [
    "CONVERTED_DIR",
    "EXPORT_DIR",
    "ensure_converted",
    "export_policy",
    "is_hf_dir",
    "dtype_of_hf_config",
    "prepare_checkpoints",
    "resolve_dtype",
]

CONVERTED_DIR = "converted"
EXPORT_DIR = "hf_export"
WAIT_TIMEOUT_S = 3600.0
_FAILURE_GRACE_S = 120.0  # a failure marker this much older than the wait's start is a previous run's


def is_hf_dir(path: Optional[str]) -> bool:
    """An HF model directory: ``config.json`` and no megatron_rcpa metadata."""
    return bool(path) and os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(
        os.path.join(path, METADATA_FILE))


def _fingerprint(hf_dir: str) -> Dict[str, Any]:
    """name -> [size, mtime_ns] of the files a conversion reads (config, weights, index, assets)."""
    from megatron_rcpa.convert.hf_io import list_assets

    names = sorted({f for f in os.listdir(hf_dir) if f == "config.json" or f.endswith(".safetensors")
                    or f == "model.safetensors.index.json"} | set(list_assets(hf_dir)))
    out = {}
    for name in names:
        st = os.stat(os.path.join(hf_dir, name))
        out[name] = [st.st_size, st.st_mtime_ns]
    return {"source": os.path.realpath(hf_dir), "files": out}


def _global_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _read_marker(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None  # absent, or being replaced
    return data if isinstance(data, dict) else None


def _write_marker(path: str, data: Dict[str, Any]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _reusable(out: str, marker: Optional[Dict[str, Any]], fingerprint: Dict[str, Any]) -> bool:
    if not marker or marker.get("status") != "done" or marker.get("fingerprint") != fingerprint:
        return False
    if not is_checkpoint(out):
        return False
    from megatron_rcpa.convert.manifest import check_manifest

    try:
        return check_manifest(out, required=True)
    except ConversionError:
        return False


def ensure_converted(hf_dir: str, output_dir: str, *, wait_timeout: float = WAIT_TIMEOUT_S,
                     convert_timeout: float = 3600.0, poll_s: float = 0.5, name: Optional[str] = None) -> str:
    """The megatron checkpoint converted from ``hf_dir`` under ``<output_dir>/converted/<name>`` (``name``:
    the directory's own name by default; converted now by global rank 0 unless a matching conversion is
    there; the other ranks wait for it). Returns its path."""
    hf_dir = os.path.abspath(hf_dir.rstrip("/"))
    name = name or os.path.basename(hf_dir)
    root = os.path.join(os.path.abspath(output_dir), CONVERTED_DIR)
    out, marker_path = os.path.join(root, name), os.path.join(root, name + ".json")
    fingerprint = _fingerprint(hf_dir)
    if _global_rank() == 0:
        os.makedirs(root, exist_ok=True)
        if _reusable(out, _read_marker(marker_path), fingerprint):
            print(f"[rcpa] model checkpoint {hf_dir}: reusing its conversion {out}", flush=True)
            return out
        from megatron_rcpa.convert.hf_to_megatron import convert_hf_to_megatron

        _write_marker(marker_path, {"status": "converting", "fingerprint": fingerprint, "time": time.time()})
        alone = not torch.distributed.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) == 1
        print(f"[rcpa] model checkpoint {hf_dir} is an HF directory: converting it into {out}", flush=True)
        t0 = time.perf_counter()
        try:
            convert_hf_to_megatron(hf_dir, out, overwrite=True, in_process=alone, timeout=convert_timeout)
        except BaseException as exc:
            from megatron_rcpa.convert.cli import describe_failure

            _write_marker(marker_path, {"status": "failed", "fingerprint": fingerprint, "time": time.time(),
                                        "error": describe_failure(exc)})
            raise
        _write_marker(marker_path, {"status": "done", "fingerprint": fingerprint, "time": time.time()})
        print(f"[rcpa] converted {hf_dir} in {time.perf_counter() - t0:.1f} s", flush=True)
        return out
    start = time.time()
    while True:
        marker = _read_marker(marker_path)
        if marker and marker.get("fingerprint") == fingerprint:
            if marker.get("status") == "done" and is_checkpoint(out):
                return out
            if marker.get("status") == "failed" and float(marker.get("time", 0)) >= start - _FAILURE_GRACE_S:
                raise ConversionError(f"global rank 0 failed to convert the HF directory {hf_dir} into {out}: "
                                      f"{marker.get('error')}")
        if time.time() - start > wait_timeout:
            state = marker.get("status") if marker else "no marker yet"
            raise ConversionError(f"rank {_global_rank()}: waited {wait_timeout:.0f} s for global rank 0 to convert "
                                  f"the HF directory {hf_dir} into {out} ({marker_path}: {state}); is rank 0 "
                                  "running, and is run.output_dir on a file system every rank shares?")
        time.sleep(poll_s)


def prepare_checkpoints(cfg, **kwargs: Any):
    """``cfg`` with an HF ``model.checkpoint`` / ``model.reference_checkpoint`` replaced by its conversion
    (:func:`ensure_converted`) and ``model.dtype = auto`` resolved (:func:`resolve_dtype`)."""
    changes, names = {}, {}
    for key in ("checkpoint", "reference_checkpoint"):
        path = getattr(cfg.model, key)
        if is_hf_dir(path):
            real, name = os.path.realpath(path), os.path.basename(os.path.abspath(path.rstrip("/")))
            if names.get(name, real) != real:  # another directory of the same name: a conversion of its own
                name += "-reference"
            names[name] = real
            changes[key] = ensure_converted(path, cfg.run.output_dir, name=name, **kwargs)
    model = dataclasses.replace(cfg.model, **changes) if changes else cfg.model
    model = dataclasses.replace(model, dtype=resolve_dtype(model))
    return dataclasses.replace(cfg, model=model)


def resolve_dtype(model) -> str:
    """``model.dtype``: fp32 | bf16 as given; ``auto``: fp32 for ``model.tiny``, else the checkpoint's stored
    dtype (a checkpoint stored in fp16 needs an explicit choice: training runs in fp32 or bf16)."""
    if model.dtype != "auto":
        return model.dtype
    if model.tiny or not model.checkpoint:
        return "fp32"
    from megatron_rcpa.convert.checkpoint import read_metadata

    stored = read_metadata(model.checkpoint).dtype
    if stored not in ("fp32", "bf16"):
        raise ValueError(f"model.dtype = auto but {model.checkpoint!r} stores {stored} tensors; training runs in "
                         "fp32 or bf16: set model.dtype=bf16 (or fp32)")
    return stored


_HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def dtype_of_hf_config(config: Dict[str, Any]) -> str:
    """``auto`` for an HF config without weights (the planner): its ``dtype`` / ``torch_dtype`` (a VLM's
    ``text_config`` too) as fp32 | bf16; fp32 when it names none (transformers' default)."""
    for d in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            name = d.get(key) if isinstance(d, dict) else None
            if isinstance(name, str) and name.replace("torch.", "") in _HF_DTYPES:
                found = _HF_DTYPES[name.replace("torch.", "")]
                if found == "fp16":
                    raise ValueError("model.dtype = auto but the HF config stores float16; training runs in fp32 or "
                                     "bf16: set model.dtype=bf16 (or fp32)")
                return found
    return "fp32"


def export_policy(policy: torch.nn.Module, meta, out_dir: str, *, assets_dir: Optional[str],
                  max_shard_size: Any = "5GB", dp_rank: int = 0) -> Optional[list]:
    """Write ``policy`` (this rank's stage; every rank calls, collective) as an HF directory ``out_dir`` with
    the converter's export: returns the safetensors file names on global rank 0, None elsewhere."""
    from megatron_rcpa.convert.megatron_to_hf import export_stage_parts, finish_export, parse_size

    max_bytes = parse_size(max_shard_size)
    out_dir = os.path.abspath(out_dir.rstrip("/"))
    tmp = out_dir + ".incomplete"
    rank = torch.distributed.get_rank()
    if rank == 0:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    torch.distributed.barrier()
    error, parts = None, []
    try:
        if dp_rank == 0:  # every TP rank of the stage iterates (TP gather); the first TP rank writes
            parts = export_stage_parts(policy, meta, tmp, None, max_bytes)
    except Exception as exc:  # noqa: BLE001 - reported on every rank below, not left hanging in a collective
        error = f"rank {rank}: {type(exc).__name__}: {exc}"
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (error, parts))
    errors = [e for e, _ in gathered if e]
    files = None
    if not errors and rank == 0:
        try:
            files = finish_export(tmp, out_dir, [p for _, ps in gathered for p in ps], meta, None, assets_dir)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"rank 0: {type(exc).__name__}: {exc}")
    flag = [errors[0] if errors else None]
    torch.distributed.broadcast_object_list(flag, src=0)
    if flag[0] is not None:
        if rank == 0:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        raise ConversionError(f"HF export to {out_dir} failed: {flag[0]}")
    return files
