"""Conversion without building the model: the policy is built on the ``meta`` device (shapes, no memory), its
megatron sharded state dict says what the checkpoint holds (keys, global shapes, offsets, replicas, factories), and
the tensors are made or read one at a time.

* HF -> megatron (:class:`LazyTorchDistSave`): megatron's own ``dist_checkpointing.save`` (metadata.json, common
  state, sharding validation) with a ``torch_dist`` strategy whose writer asks for each tensor only when it
  writes it (``resolve_data`` calls the converter's function for that shard) and drops it once written. The
  checkpoint is the one megatron's own save writes (one ``__<rank>_0.distcp`` per rank: byte for byte what
  megatron-core 0.19 writes; 0.16 spreads a rank's tensors over two files, which load the same).
* megatron -> HF (:func:`load_in_groups`): the sharded state dict is loaded one group of tensors at a time (a
  decoder layer, a vision block, one other tensor) with ``dist_checkpointing.load`` of that subset, collectively
  (every rank walks the same list of groups, its own part of a group may be empty).

Peak memory is then about one decoder layer or the largest tensor (and the HF tensors it is made of), not the
model.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_rcpa.convert.errors import ConversionError

__all__ = ["LazyTorchDistSave", "build_meta_policy", "group_of", "load_in_groups",
           "progress_bar"]

_GROUP = re.compile(r"^(.*?\.(?:layers|blocks)\.\d+)\.")


def build_meta_policy(family: Any, hf_config: Any, *, params_dtype: Any, padded_vocab_size: int) -> torch.nn.Module:
    """This rank's policy stage on the ``meta`` device: every parameter has its shape and dtype, none has memory."""
    with torch.device("meta"):
        policy = family.build_policy(hf_config, params_dtype=params_dtype, padded_vocab_size=padded_vocab_size,
                                     perform_initialization=False)
    real = sorted(n for n, t in policy.state_dict(keep_vars=True).items()
                  if isinstance(t, torch.Tensor) and t.device.type != "meta")
    if real:
        raise ConversionError(f"internal: the {family.name} policy built on the meta device still allocates "
                              f"{real[:5]} (a builder passes an explicit device)")
    return policy


def group_of(name: str) -> str:
    """The loading group of a policy tensor: its decoder layer / vision block (``...layers.N`` /
    ``...blocks.N``), else the tensor itself."""
    m = _GROUP.match(name)
    return m.group(1) if m else name


def progress_bar(total: int, desc: str) -> Any:
    """A tqdm bar (``update(n)``, ``close()``) on global rank 0 when stderr is a terminal, else None."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank != 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", leave=False)


# ------------------------------------------------------------------------------------------ lazy save
def _leaves(sharded_state_dict: Any) -> Iterator[Any]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    yield from nested_values(sharded_state_dict)


class LazyTorchDistSave:
    """Factory of megatron's ``torch_dist`` save strategy whose tensors are made when written.

    ``sources``: id of a (meta) policy tensor -> a function returning its real value on this rank (the TP
    shard, the policy's dtype and shape). A sharded tensor whose data is that tensor, or a view of it (a
    factory's part, e.g. the gate/up halves of a gated FC1 at TP > 1), is written from it.
    """

    def __new__(cls, sources: Dict[int, Callable[[], torch.Tensor]], *,
                on_write: Optional[Callable[[], None]] = None):
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

        class _Strategy(TorchDistSaveShardedStrategy):
            def save(self, sharded_state_dict: Any, checkpoint_dir: Any) -> None:
                _lazy_save(sharded_state_dict, str(checkpoint_dir), sources, on_write,
                           self.keep_only_main_replica)

        return _Strategy("torch_dist", 1)


def _view_geometry(data: torch.Tensor, sources: Dict[int, Callable[[], torch.Tensor]], key: str):
    base = data if id(data) in sources else data._base
    if base is None or id(base) not in sources:
        raise ConversionError(f"internal: the sharded tensor {key!r} is neither a policy tensor nor a view of one")
    if base is data:
        return id(base), None
    return id(base), (tuple(data.size()), tuple(data.stride()), int(data.storage_offset()))


def _lazy_save(sharded_state_dict: Any, checkpoint_dir: str, sources: Dict[int, Callable[[], torch.Tensor]],
               on_write: Optional[Callable[[], None]], keep_only_main_replica: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint.planner import WriteItemType

    # Where each shard written here comes from, by (checkpoint key, global offset): the index of its write item.
    flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica)
    where: Dict[Tuple[str, Tuple[int, ...]], Tuple[int, Any, Tuple[int, ...]]] = {}
    for leaves in flat.values():
        for leaf in leaves:
            if isinstance(leaf, ShardedTensor) and leaf.data is not None:
                if leaf.flattened_range is not None:
                    raise ConversionError(f"internal: sharded tensor {leaf.key!r} is flattened (a distributed-"
                                          "optimizer layout); a policy checkpoint never is")
                src, view = _view_geometry(leaf.data, sources, leaf.key)
                where[(leaf.key, tuple(leaf.global_offset))] = (src, view, tuple(leaf.data.shape))
    uses: Dict[int, int] = {}
    for src, _, _ in where.values():
        uses[src] = uses.get(src, 0) + 1
    pyt_state_dict = mcore_to_pyt_state_dict(flat, False)
    kept: Dict[int, torch.Tensor] = {}  # a tensor written in parts (gate/up halves) until its last part

    def materialize(fqn: str, offset: Tuple[int, ...], sizes: Sequence[int]) -> torch.Tensor:
        try:
            src, view, shape = where[(fqn, offset)]
        except KeyError:
            raise ConversionError(f"internal: no source for sharded tensor {fqn!r} at offset {list(offset)}") from None
        value = kept[src] if src in kept else sources[src]()
        uses[src] -= 1
        if uses[src] > 0:
            kept[src] = value
        else:
            kept.pop(src, None)
        if view is not None:
            value = value.as_strided(*view)
        if value.numel() != int(torch.Size(sizes).numel()) or tuple(value.shape) != shape:
            raise ConversionError(f"internal: sharded tensor {fqn!r} at {list(offset)} expects shape {list(shape)} "
                                  f"(chunk {list(sizes)}), the converter made {list(value.shape)}")
        if on_write is not None:
            on_write()
        return value.reshape(tuple(sizes))

    class _LazySavePlanner(MCoreSavePlanner):
        def resolve_data(self, write_item):  # noqa: D401 - torch planner API
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            chunk = write_item.tensor_data.chunk
            return materialize(write_item.index.fqn, tuple(write_item.index.offset), chunk.sizes)

    planner = _LazySavePlanner(dedup_replicated_tensors=not keep_only_main_replica, flatten_state_dict=False,
                               flatten_sharded_tensors=False)
    dcp.save(pyt_state_dict, storage_writer=_StreamingFileWriter(checkpoint_dir), planner=planner)


def _StreamingFileWriter(path: str):
    """torch's ``FileSystemWriter`` writing this rank's items into one ``.distcp`` file (``__<rank>_0.distcp``,
    bytes objects first, then the tensors in the plan's order, each ``torch.save``d by torch's own item writer,
    fsync at the end) as megatron's writer lays it out, but asking for each tensor only when it writes it and
    dropping it right after (torch's own loop keeps every tensor of a file until the file is closed)."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import _write_item
    from torch.distributed.checkpoint.planner import WriteItemType

    class Writer(FileSystemWriter):
        def write_data(self, plan, planner):
            items = ([i for i in plan.items if i.type == WriteItemType.BYTE_IO]
                     + [i for i in plan.items if i.type != WriteItemType.BYTE_IO])
            results = []
            if items:
                name = f"{plan.storage_data.prefix}0.distcp"
                with self.fs.create_stream(self.fs.concat_path(self.path, name), "wb") as stream:
                    for item in items:
                        data = planner.resolve_data(item)
                        if item.type != WriteItemType.BYTE_IO:
                            data = data.detach().cpu()
                            if data.untyped_storage().nbytes() != data.nbytes:  # torch.save writes whole storages
                                data = data.clone()
                        results.append(_write_item(self.transforms, stream, data, item, name,
                                                   self.serialization_format))
                        del data
                    stream.flush()
                    os.fsync(stream.fileno())
            done: torch.futures.Future = torch.futures.Future()
            done.set_result(results)
            return done

    return Writer(path, single_file_per_rank=True, sync_files=True, thread_count=1)


# ------------------------------------------------------------------------------------------ grouped load
def load_in_groups(policy: torch.nn.Module, model_dir: str, names: Sequence[str],
                   group_names: Callable[[str], str]) -> Iterator[Tuple[str, Dict[str, torch.Tensor]]]:
    """Load this rank's tensors ``names`` (state-dict names of the meta ``policy``) from the dist checkpoint
    ``model_dir``, one group at a time: yields (group, {name: tensor}) in the order of ``names``. Collective:
    every rank walks the union of all ranks' groups (``dist_checkpointing.load`` plans collectively), with an
    empty part where it holds none of a group. The caller wraps it in ``restricted_metadata()``."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    by_id = {id(t): n for n, t in policy.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)}
    wanted = set(names)
    leaves: Dict[str, Any] = {}
    for leaf in _leaves(policy.sharded_state_dict()):
        if isinstance(leaf, (ShardedTensor, ShardedTensorFactory)) and id(leaf.data) in by_id:
            name = by_id[id(leaf.data)]
            if name in wanted:
                leaves[name] = leaf
    missing = [n for n in names if n not in leaves]
    if missing:
        raise ConversionError(f"internal: no sharded tensor for policy tensor(s) {missing[:5]}")
    mine: Dict[str, List[str]] = {}
    for n in names:
        mine.setdefault(group_names(n), []).append(n)
    order = list(mine)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        gathered: List[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, order)
        order = list(dict.fromkeys(g for rank_groups in gathered for g in rank_groups))
    for group in order:
        part = {n: dataclasses.replace(leaves[n], data=torch.empty(leaves[n].data.shape, dtype=leaves[n].data.dtype))
                for n in mine.get(group, [])}
        state = _load_subset(part, model_dir)
        if mine.get(group):
            yield group, {n: state[n] for n in mine[group]}


def _load_subset(part: Dict[str, Any], model_dir: str) -> Dict[str, Any]:
    """``dist_checkpointing.load`` of a subset of a checkpoint's shards. A decoder layer's tensor is one slice of
    a layer-stacked global tensor (``prepend_axis_num``); megatron reads such a tensor as a regular grid of all
    its slices, so each is loaded as the plain chunk it is (global offset and shape, a leading axis of 1), then
    reshaped back (factories are applied before and merged after, as megatron's load does)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedTensor,
        ShardedTensorFactory,
        apply_factories,
        apply_factory_merges,
    )

    factories, _ = extract_matching_values(part, lambda x: isinstance(x, ShardedTensorFactory),
                                           return_lists_as_dicts=True)
    apply_factories(part)
    shapes: Dict[int, Tuple[int, ...]] = {}

    def as_chunk(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: as_chunk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [as_chunk(v) for v in x]
        if isinstance(x, ShardedTensor) and x.prepend_axis_num:
            shape = (1,) * x.prepend_axis_num + tuple(x.local_shape)
            chunk = dataclasses.replace(x, data=x.data.reshape(shape), local_shape=shape, prepend_axis_num=0,
                                        axis_fragmentations=None)
            shapes[id(chunk)] = tuple(x.local_shape)
            return chunk
        return x

    def restore(template: Any, loaded: Any) -> Any:
        if isinstance(template, dict):
            return {k: restore(v, loaded[k]) for k, v in template.items()}
        if isinstance(template, list):
            return [restore(v, t) for v, t in zip(template, loaded)]
        return loaded.reshape(shapes[id(template)]) if id(template) in shapes else loaded

    chunks = as_chunk(part)
    # a subset of the checkpoint: the whole-checkpoint access check (every shard read once) does not apply
    state = dist_checkpointing.load(chunks, model_dir, validate_access_integrity=False)
    if isinstance(state, tuple):
        state = state[0]
    state = {k: restore(chunks[k], state[k]) for k in chunks}
    return apply_factory_merges(state, factories)
