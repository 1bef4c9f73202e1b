"""HF checkpoint -> megatron policy checkpoint (loads at any TP/PP).

:func:`plan_hf_to_megatron` checks everything that can be checked before a model is built (architecture,
tensor names and shapes against transformers' own module definition, TP/PP divisibility) and raises
:class:`~megatron_rcpa.convert.errors.ConversionError` naming the tensor / key / value.
:func:`convert_hf_to_megatron` then runs :func:`convert_rank` on a TP x PP grid (default 1 x 1; the checkpoint is
the same at any grid): each rank builds its policy stage on the ``meta`` device (no memory) and saves it with
:func:`~megatron_rcpa.convert.checkpoint.save_checkpoint` (written aside, renamed when complete) through a
strategy that reads and transforms each tensor from the safetensors only when it is written
(:mod:`~megatron_rcpa.convert.streaming`), so the model is never held in memory. :func:`load_hf_weights` fills
a built policy instead (a trainer that starts from HF weights).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from megatron_rcpa.convert.checkpoint import INCOMPLETE_SUFFIX, CheckpointMetadata, refuse_overlap, save_checkpoint
from megatron_rcpa.convert.errors import ConversionError
from megatron_rcpa.convert.families import ModelFamily, family_by_name, family_for_config
from megatron_rcpa.convert.hf_io import HFCheckpointReader, load_hf_config, read_config_dict
from megatron_rcpa.convert.manifest import MANIFEST_FILE, check_manifest
from megatron_rcpa.convert.streaming import LazyTorchDistSave, build_meta_policy, progress_bar
from megatron_rcpa.convert.weight_maps import (
    Kind,
    ModuleMap,
    TensorMap,
    expand_tensor_maps,
    globalize_layer_index,
    to_megatron_shard,
)
from megatron_rcpa.models.decoder import check_parallel_layout, dtype_name, pad_vocab_size, parse_dtype

__all__ = [
    "ConversionPlan",
    "bind_policy_tensors",
    "convert_hf_to_megatron",
    "convert_rank",
    "load_hf_weights",
    "plan_hf_to_megatron",
]

_SAFETENSORS_DTYPES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}


@dataclasses.dataclass(frozen=True)
class ConversionPlan:
    hf_dir: str
    family: str
    hf_config: Dict[str, Any]  # config.json as read
    dtype: str  # dtype of the megatron checkpoint
    source_dtype: str  # dtype of (most of) the HF tensors
    hf_tensor_dtypes: Dict[str, str]  # the HF tensors of another dtype (restored on export)
    vocab_size: int
    padded_vocab_size: int
    tp: int
    pp: int

    def metadata(self) -> CheckpointMetadata:
        return CheckpointMetadata(family=self.family, hf_config=self.hf_config, dtype=self.dtype,
                                  vocab_size=self.vocab_size, padded_vocab_size=self.padded_vocab_size,
                                  source_dtype=self.source_dtype, hf_tensor_dtypes=dict(self.hf_tensor_dtypes),
                                  extra={"converted_from": os.path.abspath(self.hf_dir)})


def _fmt(names: List[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _claimed_hf_names(family: ModelFamily, hf_config: Any, expected: Dict[str, Tuple[int, ...]]) -> set:
    entries = family.table(hf_config)
    dims = family.decoder_dims(hf_config)
    claimed = set()
    for _, (_, hf_names) in expand_tensor_maps(entries, dims.num_layers).items():
        claimed.update(hf_names)
    for entry in entries:
        if isinstance(entry, ModuleMap):
            claimed.update(n for n in expected if n.startswith(entry.hf_prefix))
    return claimed


def plan_hf_to_megatron(hf_dir: str, *, dtype: Optional[str] = None, tp: int = 1, pp: int = 1,
                        make_vocab_size_divisible_by: int = 128) -> ConversionPlan:
    """Validate an HF directory for conversion at a TP/PP grid; ConversionError on anything wrong."""
    config_dict = read_config_dict(hf_dir)
    family = family_for_config(config_dict)
    hf_config = family.hf_config(load_hf_config(hf_dir))
    try:
        dims = family.decoder_dims(hf_config)
        padded = pad_vocab_size(dims.vocab_size, make_vocab_size_divisible_by)
        check_parallel_layout(dims, tp=tp, pp=pp, padded_vocab_size=padded)
        if family.check_tp is not None:
            family.check_tp(hf_config, tp)
    except ConversionError:
        raise
    except ValueError as exc:
        raise ConversionError(f"{os.path.join(hf_dir, 'config.json')}: {exc}") from exc

    reader = HFCheckpointReader(hf_dir, family.hf_aliases)
    present = set(reader.names())
    expected = family.expected_hf_tensors(hf_config)
    missing = sorted(set(expected) - present)
    if missing:
        raise ConversionError(f"missing tensor(s) in {hf_dir!r}: {_fmt(missing)}")
    allowed_extra = {family.tied_head} if dims.tie_word_embeddings else set()
    unexpected = sorted(n for n in present - set(expected) - allowed_extra if not family.is_ignored(n))
    if unexpected:
        raise ConversionError(f"unexpected tensor(s) in {hf_dir!r} (not part of a {family.architectures[0]} "
                              f"with this config.json): {_fmt(unexpected)}")
    for name, shape in sorted(expected.items()):
        actual = reader.shape(name)
        if actual != shape:
            raise ConversionError(f"tensor {name!r} in {hf_dir!r} has shape {list(actual)}, but config.json "
                                  f"implies {list(shape)}")
    unmapped = sorted(set(expected) - _claimed_hf_names(family, hf_config, expected))
    if unmapped:
        raise ConversionError(f"internal: the {family.name} table has no entry for HF tensor(s) {_fmt(unmapped)}")

    dtypes = {}
    for name in expected:
        stored = reader.dtype(name)
        if stored not in _SAFETENSORS_DTYPES:
            raise ConversionError(f"tensor {name!r} in {hf_dir!r} has dtype {stored}; expected F32, BF16 or F16")
        dtypes[name] = _SAFETENSORS_DTYPES[stored]
    counts = {d: list(dtypes.values()).count(d) for d in set(dtypes.values())}
    source_dtype = max(sorted(counts), key=counts.get)
    target = dtype_name(parse_dtype(dtype)) if dtype is not None else source_dtype
    reader.close()
    return ConversionPlan(hf_dir=hf_dir, family=family.name, hf_config=config_dict, dtype=target,
                          source_dtype=source_dtype,
                          hf_tensor_dtypes={n: d for n, d in sorted(dtypes.items()) if d != source_dtype},
                          vocab_size=dims.vocab_size, padded_vocab_size=padded, tp=tp, pp=pp)


# ------------------------------------------------------------------------------- binding to a policy
def _decoder_layer_offset(policy: torch.nn.Module) -> int:
    """Global index of this stage's first decoder layer: megatron's own ``get_transformer_layer_offset`` of the
    decoder's config (uneven first/last pipeline stages included), checked against the stage's first layer's
    ``layer_number`` (global, 1-based)."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    decoder = getattr(getattr(policy, "language_model", None), "decoder", None)
    if decoder is None:
        return 0
    offset = int(get_transformer_layer_offset(decoder.config))
    if len(decoder.layers) and int(decoder.layers[0].layer_number) - 1 != offset:
        raise ConversionError(f"internal: this stage's first decoder layer is global layer "
                              f"{int(decoder.layers[0].layer_number) - 1} but megatron's layer offset is {offset}")
    return offset


def bind_policy_tensors(policy: torch.nn.Module, family: ModelFamily,
                        hf_config: Any) -> List[Tuple[str, torch.Tensor, TensorMap, Tuple[str, ...]]]:
    """(local name, parameter/buffer, its TensorMap, its HF names) for every tensor in this rank's stage."""
    entries = family.table(hf_config)
    dims = family.decoder_dims(hf_config)
    expanded = expand_tensor_maps(entries, dims.num_layers)
    modules = [e for e in entries if isinstance(e, ModuleMap)]
    offset = _decoder_layer_offset(policy)
    bound = []
    for name, tensor in policy.state_dict(keep_vars=True).items():
        if not isinstance(tensor, torch.Tensor):  # _extra_state
            continue
        # decoder layers are numbered per stage; the vision tower (first stage only) is not pipelined
        global_name = globalize_layer_index(name, offset) if name.startswith("language_model.") else name
        if global_name in expanded:
            tmap, hf_names = expanded[global_name]
            bound.append((name, tensor, tmap, hf_names))
            continue
        module = next((m for m in modules if global_name.startswith(m.megatron_prefix)), None)
        if module is None:
            raise ConversionError(f"internal: megatron tensor {name!r} has no entry in the {family.name} table")
        hf_name = module.hf_prefix + global_name[len(module.megatron_prefix):]
        bound.append((name, tensor, TensorMap(global_name, (hf_name,), Kind.REPLICATED), (hf_name,)))
    return bound


def _shard_maker(reader: HFCheckpointReader, layouts: Dict[str, Any], tp_rank: int, tp_size: int):
    """``make(name, tensor, tmap, hf_names)``: this TP rank's megatron value of one bound policy tensor, read from
    the HF files and transformed (ConversionError naming the tensor when it does not fit)."""

    @torch.no_grad()
    def make(name: str, tensor: torch.Tensor, tmap: TensorMap, hf_names: Tuple[str, ...]) -> torch.Tensor:
        sources = [reader.get(n) for n in hf_names]
        try:
            local = to_megatron_shard(tmap.kind, sources, tp_rank=tp_rank, tp_size=tp_size,
                                      layout=layouts[tmap.layout])
        except ValueError as exc:
            raise ConversionError(f"cannot build megatron {name!r} from HF {list(hf_names)}: {exc}") from exc
        if tuple(local.shape) != tuple(tensor.shape):
            raise ConversionError(f"megatron {name!r} has shape {list(tensor.shape)} on TP rank {tp_rank}, but HF "
                                  f"{list(hf_names)} give {list(local.shape)}")
        return local.to(dtype=tensor.dtype).contiguous()

    return make


@torch.no_grad()
def load_hf_weights(policy: torch.nn.Module, hf_dir: str, *, family: Optional[ModelFamily] = None,
                    hf_config: Any = None) -> int:
    """Fill this rank's policy stage from an HF safetensors checkpoint; returns the number of tensors set.

    Call on every rank after building the policy (no collective). ConversionError names the tensor that
    is missing or does not fit.
    """
    from megatron.core import parallel_state

    if family is None:
        family = family_for_config(read_config_dict(hf_dir))
    if hf_config is None:
        hf_config = load_hf_config(hf_dir)
    hf_config = family.hf_config(hf_config)
    reader = HFCheckpointReader(hf_dir, family.hf_aliases)
    make = _shard_maker(reader, family.layouts(hf_config, int(policy.padded_vocab_size)),
                        parallel_state.get_tensor_model_parallel_rank(),
                        parallel_state.get_tensor_model_parallel_world_size())
    count = 0
    for name, tensor, tmap, hf_names in bind_policy_tensors(policy, family, hf_config):
        tensor.data.copy_(make(name, tensor, tmap, hf_names).to(device=tensor.device))
        count += 1
    reader.close()
    return count


def convert_rank(plan: ConversionPlan, out_dir: str, overwrite: bool = False) -> int:
    """This rank's part of a conversion (every rank of an initialised megatron grid calls it). The policy
    stage is built on the ``meta`` device (no memory) and saved collectively with a strategy that makes each
    tensor from the HF files when it is written (:class:`~megatron_rcpa.convert.streaming.LazyTorchDistSave`):
    peak memory is the few HF tensors one megatron tensor is made of, not the model.
    Returns the number of policy tensors bound here."""
    from megatron.core import parallel_state

    family = family_by_name(plan.family)
    hf_config = family.hf_config(load_hf_config(plan.hf_config))
    policy = build_meta_policy(family, hf_config, params_dtype=plan.dtype, padded_vocab_size=plan.padded_vocab_size)
    reader = HFCheckpointReader(plan.hf_dir, family.hf_aliases)
    make = _shard_maker(reader, family.layouts(hf_config, plan.padded_vocab_size),
                        parallel_state.get_tensor_model_parallel_rank(),
                        parallel_state.get_tensor_model_parallel_world_size())
    bound = bind_policy_tensors(policy, family, hf_config)
    sources = {id(tensor): functools.partial(make, name, tensor, tmap, hf_names)
               for name, tensor, tmap, hf_names in bound}
    bar = progress_bar(len(bound), "HF -> megatron")
    strategy = LazyTorchDistSave(sources, on_write=None if bar is None else lambda: bar.update(1))
    try:
        save_checkpoint(policy, out_dir, plan.metadata(), assets_from=plan.hf_dir, overwrite=overwrite,
                        sharded_strategy=strategy)
    finally:
        reader.close()
        if bar is not None:
            bar.close()
    return len(bound)


def convert_hf_to_megatron(hf_dir: str, out_dir: str, *, dtype: Optional[str] = None, tp: int = 1, pp: int = 1,
                           make_vocab_size_divisible_by: int = 128, overwrite: bool = False,
                           in_process: bool = False, timeout: float = 3600.0,
                           verify: bool = False) -> CheckpointMetadata:
    """Convert an HF directory into a megatron policy checkpoint at ``out_dir``; returns its metadata.

    ``dtype`` (fp32 | bf16 | fp16) defaults to the HF tensors' dtype. ``tp``/``pp`` choose the grid the
    conversion runs on (the result loads at any TP/PP). ``in_process`` runs a 1x1 grid in this process.
    An HF directory with a manifest (one this project exported) has its file sizes checked, and with
    ``verify`` their sha256 too. An output that is, contains or lies inside the input is refused.
    """
    from megatron_rcpa.convert.runtime import run_on_layout

    out_dir = os.path.abspath(out_dir.rstrip("/"))
    refuse_overlap(hf_dir, out_dir, source_what="input HF directory")
    if verify or os.path.isfile(os.path.join(hf_dir, MANIFEST_FILE)):
        check_manifest(hf_dir, checksums=verify, what="HF directory")
    if os.path.exists(out_dir) and not overwrite:
        raise ConversionError(f"output {out_dir!r} already exists (use --overwrite to replace it)")
    plan = plan_hf_to_megatron(hf_dir, dtype=dtype, tp=tp, pp=pp,
                               make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    try:
        run_on_layout(convert_rank, tp=tp, pp=pp, args=(plan, out_dir, overwrite), timeout=timeout,
                      in_process=in_process)
    except BaseException:
        import shutil

        shutil.rmtree(out_dir + INCOMPLETE_SUFFIX, ignore_errors=True)
        raise
    from megatron_rcpa.convert.checkpoint import read_metadata

    return read_metadata(out_dir)
