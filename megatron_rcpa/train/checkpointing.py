"""Where trainer checkpoints live, which one a run resumes from, and how one is published safely.

Layout: ``<output_dir>/checkpoints/step_NNNNNNN/{policy/, optimizer/, trainer_state.json}`` plus
``<output_dir>/latest`` naming the newest one (for people and tools; resume does not depend on it).

- A checkpoint is written into ``step_NNNNNNN.incomplete``; every rank fsyncs the files, then rank 0 fsyncs the
  directory and renames it into place and fsyncs ``checkpoints/``. ``trainer_state.json`` is written last, so a
  directory is *complete* when it holds ``trainer_state.json`` (readable JSON naming its step), ``policy/`` and
  ``optimizer/``. A kill -9 at any moment leaves the previous complete checkpoints untouched.
- Resume (``run.resume=auto``) scans ``checkpoints/`` for the newest complete checkpoint; ``latest`` is only
  compared with it (a missing or stale ``latest`` is reported, not trusted).
- A complete checkpoint of the same step is never deleted before its replacement is in place: it is renamed
  aside (``.replaced``), the new one renamed in, and only then removed. Leftover ``*.incomplete`` directories
  (a crashed save) are removed at the start of the next save.
- ``run.keep_last=N`` removes all but the N newest complete checkpoints after each successful save.
- With ``parallel.distributed_optimizer=true`` the optimizer state is saved in megatron's ``dp_reshardable``
  format (:data:`DISTRIB_OPTIM_FORMAT`): fully parallel, no gather; it reshards over data parallel only, so a
  resume must keep TP and PP (the trainer checks and says so).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import List, Optional, Tuple

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
INCOMPLETE_SUFFIX = ".incomplete"
REPLACED_SUFFIX = ".replaced"
DISTRIB_OPTIM_FORMAT = "dp_reshardable"
_STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoints_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS_DIR)


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(checkpoints_root(output_dir), f"step_{step:07d}")


def read_state(path: str) -> Optional[dict]:
    """``trainer_state.json`` of checkpoint ``path``, or None when it is missing or unreadable."""
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("step"), int) else None


def is_complete(path: str) -> bool:
    return (read_state(path) is not None and os.path.isdir(os.path.join(path, "policy"))
            and os.path.isdir(os.path.join(path, "optimizer")))


def complete_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """``(step, path)`` of every complete checkpoint under ``output_dir``, oldest first."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        path = os.path.join(root, name)
        if m and is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def find_resume_checkpoint(output_dir: str) -> Tuple[Optional[str], Optional[str]]:
    """The newest complete checkpoint (or None) and a note when ``latest`` disagrees with it (or None)."""
    found = complete_checkpoints(output_dir)
    newest = found[-1][1] if found else None
    latest_file = os.path.join(output_dir, LATEST_FILE)
    named = None
    if os.path.isfile(latest_file):
        with open(latest_file, encoding="utf-8") as f:
            named = f.read().strip()
    note = None
    if newest is not None and named != os.path.basename(newest):
        if named is None:
            note = f"{latest_file} is missing"
        else:
            note = f"{latest_file} names {named!r}, which is not the newest complete checkpoint"
        note += f"; resuming from the newest complete one, {os.path.basename(newest)}"
    return newest, note


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file and directory under ``path`` (files first, then their directories)."""
    for dirpath, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                continue
            with open(full, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(dirpath)


def write_file_durably(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, rename, fsync the directory)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def remove_leftovers(output_dir: str) -> List[str]:
    """Remove ``*.incomplete`` directories of crashed saves; a ``*.replaced`` one is removed when its step's
    checkpoint is complete, else renamed back (a crash between the two renames of :func:`publish`)."""
    root = checkpoints_root(output_dir)
    removed = []
    if not os.path.isdir(root):
        return removed
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.endswith(INCOMPLETE_SUFFIX):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif name.endswith(REPLACED_SUFFIX):
            final = path[: -len(REPLACED_SUFFIX)]
            if is_complete(final):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            elif is_complete(path):
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.rename(path, final)
    return removed


def publish(tmp: str, final: str, output_dir: str) -> None:
    """Rank 0, after every rank has written and fsynced ``tmp``: move it into place as ``final`` and point
    ``latest`` at it. An existing complete ``final`` is replaced only once the new one is in place."""
    root = os.path.dirname(final)
    _fsync_dir(tmp)
    aside = None
    if os.path.exists(final):
        if is_complete(final):
            aside = final + REPLACED_SUFFIX
            if os.path.exists(aside):
                shutil.rmtree(aside)
            os.rename(final, aside)
        else:
            shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    write_file_durably(os.path.join(output_dir, LATEST_FILE), os.path.basename(final))
    if aside is not None:
        shutil.rmtree(aside)


def prune(output_dir: str, keep_last: int, protect: str) -> List[str]:
    """Remove all but the ``keep_last`` newest complete checkpoints (never ``protect``); 0 keeps all."""
    if keep_last <= 0:
        return []
    found = complete_checkpoints(output_dir)
    removed = []
    for _step, path in found[:-keep_last]:
        if os.path.abspath(path) == os.path.abspath(protect):
            continue
        shutil.rmtree(path)
        removed.append(path)
    return removed


def _allocate_distributed_optimizer_state(optimizer) -> None:
    """A fresh DistributedOptimizer over torch's Adam has no state yet, and its ``sharded_state_dict(
    is_loading=True)`` reads the per-parameter ``step`` of that state (``assert len(steps) == 1``). Allocate it
    as megatron's own ``init_state_fn`` does (zeros), plus ``step`` for torch's Adam; the load overwrites all
    of it. Megatron's Float16 optimizer does the same itself; its DistributedOptimizer does not."""
    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_rcpa.train.guard import NonFiniteGuard

    inner_opt = optimizer.optimizer if isinstance(optimizer, NonFiniteGuard) else optimizer
    for opt in getattr(inner_opt, "chained_optimizers", [inner_opt]):
        if not isinstance(opt, DistributedOptimizer) or opt.optimizer is None or len(opt.optimizer.state):
            continue
        if opt.init_state_fn is None:
            continue
        opt.init_state_fn(opt.optimizer, opt.config)
        if type(opt.optimizer) in (torch.optim.Adam, torch.optim.AdamW):
            for group in opt.optimizer.param_groups:
                for p in group["params"]:
                    opt.optimizer.state[p].setdefault("step", torch.tensor(0.0))


def optimizer_sharded_state_dict(optimizer, model_sharded_state_dict, *, is_loading: bool = False):
    """The optimizer's sharded state dict in a format megatron-core can save and load (0.16 and 0.19).

    The distributed optimizer's default (``fully_sharded_model_space``) builds flattened ShardedTensors, which
    ``dist_checkpointing`` no longer accepts (``ShardedTensor.flattened_range is not supported``); ask for
    ``dp_reshardable`` instead. Other optimizers ignore the metadata."""
    metadata = {"distrib_optim_sharding_type": DISTRIB_OPTIM_FORMAT}
    if is_loading:
        _allocate_distributed_optimizer_state(optimizer)
    return optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading, metadata=metadata)


__all__ = ["CHECKPOINTS_DIR", "STATE_FILE", "LATEST_FILE", "DISTRIB_OPTIM_FORMAT", "checkpoint_dir",
           "checkpoints_root", "complete_checkpoints", "find_resume_checkpoint", "fsync_tree", "is_complete",
           "optimizer_sharded_state_dict", "prune", "publish", "read_state", "remove_leftovers",
           "write_file_durably"]
