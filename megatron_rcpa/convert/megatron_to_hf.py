"""megatron policy checkpoint -> HF directory (safetensors, config.json, tokenizer/processor files).

:func:`export_hf_tensors` turns a loaded policy stage into HF tensors (gathering TP shards; collective over
the TP group), usable by a trainer to publish weights without writing a megatron checkpoint first.
:func:`convert_megatron_to_hf` runs on a TP x PP grid (default 1 x 1) without building the model: each rank
builds its stage on the ``meta`` device and reads the checkpoint one decoder layer / vision block / other tensor
at a time (:func:`stream_hf_tensors`), the first TP rank of every stage writing its tensors as they come; then
it names the files ``model-0000i-of-0000N.safetensors`` (or one ``model.safetensors``) with
``model.safetensors.index.json``, writes ``config.json``, copies the assets
(plain file names, no symbolic links) and a manifest of sizes and sha256 (``rcpa_manifest.json``), all in
``<out>.incomplete`` renamed into place when complete. The input is checked first: its files against its
manifest (sizes; sha256 with ``verify=True``), its dist-checkpoint metadata through the allow-list, and an
output that is or contains or lies inside the input is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from megatron_rcpa.convert.checkpoint import (
    ASSETS_DIR,
    INCOMPLETE_SUFFIX,
    MODEL_DIR,
    CheckpointMetadata,
    read_metadata,
    refuse_overlap,
)
from megatron_rcpa.convert.errors import ConversionError
from megatron_rcpa.convert.families import ModelFamily, family_by_name
from megatron_rcpa.convert.hf_io import INDEX_FILE, SINGLE_FILE, copy_asset
from megatron_rcpa.convert.manifest import check_manifest, write_manifest
from megatron_rcpa.convert.safe_metadata import check_dcp_metadata
from megatron_rcpa.convert.weight_maps import Kind, to_hf_tensors
from megatron_rcpa.models.decoder import parse_dtype

__all__ = ["convert_megatron_to_hf", "export_hf_tensors", "export_stage_parts", "finish_export", "parse_size",
           "stream_hf_tensors", "write_stage_parts"]

_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def parse_size(text: Any) -> int:
    """'5GB' / '500MB' / '200KB' / 1234 -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ConversionError(f"cannot parse size {text!r} (examples: 5GB, 500MB, 1048576)")
    unit = (m.group(2) or "").upper().replace("I", "").rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[unit]
    return int(float(m.group(1)) * scale)


def _tp_state() -> Tuple[int, int, Any]:
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_group())


@torch.no_grad()
def _gathered_hf_tensors(local: torch.Tensor, tmap: Any, hf_names: Tuple[str, ...], layouts: Dict[str, Any],
                         dtype: Optional[torch.dtype]) -> List[Tuple[str, torch.Tensor]]:
    """The HF tensors of one policy tensor (this rank's TP shard ``local``) on TP rank 0, [] elsewhere; the TP
    shards are gathered collectively (every TP rank calls, in the same order)."""
    tp_size, tp_rank, group = _tp_state()
    local = local.detach()
    if tmap.kind is Kind.REPLICATED or tp_size == 1:
        shards = [local] * (1 if tmap.kind is Kind.REPLICATED else tp_size)
    else:
        if local.device.type == "cpu" and torch.distributed.get_backend(group) == "nccl":
            local = local.cuda()  # a checkpoint's tensors are read into CPU memory; NCCL gathers GPU tensors
        shards = [torch.empty_like(local) for _ in range(tp_size)]
        torch.distributed.all_gather(shards, local.contiguous(), group=group)
    if tp_rank != 0:
        return []
    # A private contiguous copy: never a view of a parameter or of another exported tensor.
    return [(hf_name, full.to(device="cpu", dtype=dtype or full.dtype).clone(memory_format=torch.contiguous_format))
            for hf_name, full in zip(hf_names, to_hf_tensors(tmap.kind, shards, layout=layouts[tmap.layout]))]


def export_hf_tensors(policy: torch.nn.Module, family: ModelFamily, hf_config: Any,
                      dtype: Optional[torch.dtype] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (HF on-disk name, full tensor) for every tensor this stage owns, on TP rank 0 (other TP ranks
    yield nothing but must iterate too: the TP shards are gathered collectively, in parameter order)."""
    from megatron_rcpa.convert.hf_to_megatron import bind_policy_tensors

    hf_config = family.hf_config(hf_config)
    layouts = family.layouts(hf_config, int(policy.padded_vocab_size))
    for _name, tensor, tmap, hf_names in bind_policy_tensors(policy, family, hf_config):
        if tmap.export:
            yield from _gathered_hf_tensors(tensor, tmap, hf_names, layouts, dtype)


def stream_hf_tensors(ckpt_dir: str, meta: CheckpointMetadata) -> Iterator[Tuple[str, torch.Tensor]]:
    """:func:`export_hf_tensors` of a checkpoint without building its policy: the policy stage is built on the
    ``meta`` device and its tensors are loaded one decoder layer / vision block / other tensor at a time
    (:func:`~megatron_rcpa.convert.streaming.load_in_groups`; collective over all ranks), each group turned into
    HF tensors and dropped before the next. The dist checkpoint's ``.metadata`` is read through the allow-list."""
    from megatron_rcpa.convert.hf_io import load_hf_config
    from megatron_rcpa.convert.hf_to_megatron import bind_policy_tensors
    from megatron_rcpa.convert.safe_metadata import restricted_metadata
    from megatron_rcpa.convert.streaming import build_meta_policy, group_of, load_in_groups, progress_bar

    family = family_by_name(meta.family)
    hf_config = family.hf_config(load_hf_config(meta.hf_config))
    policy = build_meta_policy(family, hf_config, params_dtype=meta.dtype, padded_vocab_size=meta.padded_vocab_size)
    model_dir = os.path.join(ckpt_dir, MODEL_DIR)
    check_dcp_metadata(model_dir)
    layouts = family.layouts(hf_config, meta.padded_vocab_size)
    bound = {name: (tmap, hf_names) for name, _t, tmap, hf_names in bind_policy_tensors(policy, family, hf_config)
             if tmap.export}
    bar = progress_bar(len(bound), "megatron -> HF")
    with restricted_metadata():
        for _group, loaded in load_in_groups(policy, model_dir, list(bound), group_of):
            for name, tensor in loaded.items():
                tmap, hf_names = bound[name]
                yield from _gathered_hf_tensors(tensor, tmap, hf_names, layouts, None)
                if bar is not None:
                    bar.update(1)
            del loaded
    if bar is not None:
        bar.close()


def _export_rank(ckpt_dir: str, stage_dir: str, dtype_name: Optional[str],
                 max_shard_bytes: int) -> List[Dict[str, Any]]:
    """This rank's part of an export: the checkpoint's tensors streamed group by group (no policy in memory);
    TP rank 0 of each stage writes its tensors in parts."""
    meta = read_metadata(ckpt_dir)
    return write_stage_parts(stream_hf_tensors(ckpt_dir, meta), meta, stage_dir, dtype_name, max_shard_bytes)


def export_stage_parts(policy: torch.nn.Module, meta: CheckpointMetadata, stage_dir: str,
                       dtype_name: Optional[str], max_shard_bytes: int) -> List[Dict[str, Any]]:
    """Write this stage's HF tensors (of a built ``policy``: a trainer's) into ``stage_dir`` as
    ``stageSSS-partNNNNN.safetensors`` files of at most ``max_shard_bytes`` each (a single larger tensor gets a
    part of its own); every TP rank calls (the TP shards are gathered), the first TP rank writes
    (:func:`write_stage_parts`). Returns the parts (file, names, bytes) written here.

    Without ``dtype_name`` every tensor gets back the dtype it had in the original HF checkpoint."""
    family = family_by_name(meta.family)
    return write_stage_parts(export_hf_tensors(policy, family, meta.hf_config), meta, stage_dir, dtype_name,
                             max_shard_bytes)


def write_stage_parts(tensors: Iterator[Tuple[str, torch.Tensor]], meta: CheckpointMetadata, stage_dir: str,
                      dtype_name: Optional[str], max_shard_bytes: int) -> List[Dict[str, Any]]:
    """Write (HF name, tensor) pairs into ``stage_dir`` as ``stageSSS-partNNNNN.safetensors`` parts of at most
    ``max_shard_bytes``. Streamed (:class:`_PartWriter`): each tensor's bytes go to disk as soon as it comes, so
    this holds one HF tensor. Without ``dtype_name`` every tensor gets back the dtype it had in the original HF
    checkpoint."""
    from megatron.core import parallel_state

    stage = parallel_state.get_pipeline_model_parallel_rank()
    default = parse_dtype(dtype_name or meta.source_dtype or meta.dtype)
    per_tensor = {} if dtype_name else {n: parse_dtype(d) for n, d in meta.hf_tensor_dtypes.items()}
    parts: List[Dict[str, Any]] = []
    writer: Optional[_PartWriter] = None
    for hf_name, tensor in tensors:
        tensor = tensor.to(per_tensor.get(hf_name, default))
        nbytes = tensor.numel() * tensor.element_size()
        if writer is not None and writer.size and writer.size + nbytes > max_shard_bytes:
            parts.append(writer.close())
            writer = None
        if writer is None:
            writer = _PartWriter(stage_dir, f"stage{stage:03d}-part{len(parts):05d}.safetensors")
        writer.add(hf_name, tensor)
        del tensor
    if writer is not None:
        parts.append(writer.close())
    return parts


_ST_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


class _PartWriter:
    """A safetensors file written one tensor at a time: the tensors' bytes are appended to ``<file>.data`` as
    they come; :meth:`close` writes the header (``{"__metadata__": {"format": "pt"}, name: {dtype, shape,
    data_offsets}}``, space-padded to 8-byte alignment, as safetensors writes it) and then the data, copied in
    chunks. Memory: one tensor; disk: the part is written twice."""

    _CHUNK = 64 << 20

    def __init__(self, directory: str, file: str) -> None:
        self.directory, self.file = directory, file
        self.data_path = os.path.join(directory, file + ".data")
        self._data = open(self.data_path, "wb")
        self.entries: Dict[str, Dict[str, Any]] = {}
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _ST_NAMES:
            raise ConversionError(f"cannot write HF tensor {name!r} of dtype {tensor.dtype} to safetensors")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._data.write(memoryview(flat.numpy()))
        n = flat.numel()
        self.entries[name] = {"dtype": _ST_NAMES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.size, self.size + n]}
        self.size += n

    def close(self) -> Dict[str, Any]:
        import struct

        self._data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-(8 + len(header)) % 8)
        with open(os.path.join(self.directory, self.file), "wb") as out, open(self.data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, self._CHUNK)
        os.remove(self.data_path)
        return {"file": self.file, "names": sorted(self.entries), "bytes": self.size}


def finish_export(tmp: str, out_dir: str, parts: List[Dict[str, Any]], meta: CheckpointMetadata,
                  dtype: Optional[str], assets_dir: Optional[str]) -> List[str]:
    """Turn the parts written into ``tmp`` (by :func:`export_stage_parts` on every stage) into an HF directory:
    shard names and index, ``config.json``, the assets of ``assets_dir`` listed in ``meta.assets``, the
    manifest; then rename ``tmp`` to ``out_dir`` (replacing it). Returns the safetensors file names."""
    dtype_t = parse_dtype(dtype or meta.source_dtype or meta.dtype)
    parts = sorted(parts, key=lambda p: p["file"])  # stageSSS-partNNNNN: stage order, then part order
    files = _name_shards(tmp, parts)
    config = dict(meta.hf_config)
    if not config.get("architectures"):  # a config built in code (a trainer's tiny model) names none
        config["architectures"] = [family_by_name(meta.family).architectures[0]]
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "dtype":
            config[key] = _TORCH_DTYPE_NAMES[dtype_t]
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    for name in meta.assets:
        if os.path.exists(os.path.join(tmp, name)):
            raise ConversionError(f"asset {name!r} of {assets_dir!r} would replace the exported {name}")
        copy_asset(assets_dir, name, tmp)
    write_manifest(tmp)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return files


def convert_megatron_to_hf(megatron_dir: str, out_dir: str, *, dtype: Optional[str] = None, tp: int = 1,
                           pp: int = 1, max_shard_size: Any = "5GB", overwrite: bool = False,
                           in_process: bool = False, timeout: float = 3600.0, verify: bool = False) -> List[str]:
    """Export a megatron policy checkpoint as an HF directory; returns the safetensors file names.

    ``dtype`` (one dtype for all tensors) defaults to each tensor's dtype in the HF checkpoint it was
    converted from (else the stored dtype). ``verify`` checks the sha256 of every input file against the
    checkpoint's manifest before anything is loaded (sizes are always checked).
    """
    from megatron_rcpa.convert.runtime import run_on_layout

    meta = read_metadata(megatron_dir)
    family_by_name(meta.family)
    out_dir = os.path.abspath(out_dir.rstrip("/"))
    refuse_overlap(megatron_dir, out_dir, source_what="input checkpoint")
    if os.path.exists(out_dir) and not overwrite:
        raise ConversionError(f"output {out_dir!r} already exists (use --overwrite to replace it)")
    try:
        parse_dtype(dtype or meta.source_dtype or meta.dtype)
    except ValueError as exc:
        raise ConversionError(f"{megatron_dir!r}: {exc}") from exc
    check_manifest(megatron_dir, checksums=verify)
    check_dcp_metadata(os.path.join(megatron_dir, MODEL_DIR))
    assets = os.path.join(megatron_dir, ASSETS_DIR)
    for name in meta.assets:
        if os.path.islink(os.path.join(assets, name)) or not os.path.isfile(os.path.join(assets, name)):
            raise ConversionError(f"asset {os.path.join(assets, name)} (listed in the checkpoint's metadata) is "
                                  "missing, not a regular file, or a symbolic link")
    tmp = out_dir + INCOMPLETE_SUFFIX
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        results = run_on_layout(_export_rank, tp=tp, pp=pp,
                                args=(os.path.abspath(megatron_dir), tmp, dtype, parse_size(max_shard_size)),
                                timeout=timeout, in_process=in_process)
        parts = [p for rank_parts in results for p in rank_parts]
        files = finish_export(tmp, out_dir, parts, meta, dtype, assets)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def _name_shards(directory: str, parts: List[Dict[str, Any]]) -> List[str]:
    if not parts:
        raise ConversionError("the export produced no tensors")
    seen: Dict[str, str] = {}
    for part in parts:
        for name in part["names"]:
            if name in seen:
                raise ConversionError(f"internal: HF tensor {name!r} exported twice ({seen[name]}, {part['file']})")
            seen[name] = part["file"]
    if len(parts) == 1:
        os.rename(os.path.join(directory, parts[0]["file"]), os.path.join(directory, SINGLE_FILE))
        return [SINGLE_FILE]
    files, weight_map = [], {}
    for i, part in enumerate(parts):
        file = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        os.rename(os.path.join(directory, part["file"]), os.path.join(directory, file))
        files.append(file)
        weight_map.update({name: file for name in part["names"]})
    index = {"metadata": {"total_size": sum(p["bytes"] for p in parts)}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    return files
