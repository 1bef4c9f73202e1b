"""save_sharded: megatron's synchronous save in launcher workers, with no multiprocessing state patched."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
import torch

from megatron_rcpa.runtime import checkpoint as runtime_checkpoint
from megatron_rcpa.runtime.checkpoint import save_sharded
from megatron_rcpa.runtime.launcher import run_distributed

pytestmark = pytest.mark.megatron


def _sharded(value_offset: float):
    """A TP-sharded [4, 3] tensor (rank r holds rows 2r, 2r+1) and a replicated one."""
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_rcpa.runtime.parallel import ParallelGroups

    g = ParallelGroups.from_parallel_state()
    full = torch.arange(12, dtype=torch.float32).reshape(4, 3) + value_offset
    local = full.chunk(g.tp_size, dim=0)[g.tp_rank].clone()
    shared = torch.full((2,), 7.0 + value_offset)
    return {
        "w": ShardedTensor.from_rank_offsets("w", local, (0, g.tp_rank, g.tp_size)),
        "b": ShardedTensor.from_rank_offsets("b", shared, replica_id=g.tp_rank),
    }


def _save_and_load(directory: str):
    from megatron.core import dist_checkpointing

    process = multiprocessing.current_process()
    config_before = dict(process._config)  # what the old writer lifted its daemon flag in
    if torch.distributed.get_rank() == 0:
        os.makedirs(directory)
    torch.distributed.barrier()
    save_sharded(_sharded(0.0), directory)
    config_after = dict(process._config)
    helpers = [child.pid for child in multiprocessing.active_children()]
    loaded = dist_checkpointing.load(_sharded(100.0), directory)  # templates hold other values
    return {"daemon": process.daemon, "config_unchanged": config_before == config_after,
            "w": loaded["w"], "b": loaded["b"], "helpers": helpers}


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its reaper is gone too
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.multiproc
def test_save_in_launcher_workers_round_trips_without_patching(tmp_path):
    directory = str(tmp_path / "ckpt")
    results = run_distributed(_save_and_load, world_size=2, tp=2, args=(directory,))
    full = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    for rank, r in enumerate(results):
        assert r["daemon"] is False, "launcher workers must not be daemonic (megatron's writer starts helpers)"
        assert r["config_unchanged"]
        assert torch.equal(r["w"], full.chunk(2)[rank]) and torch.equal(r["b"], torch.full((2,), 7.0))
    # the workers could start helper processes (megatron's results-queue manager), and those went with them
    assert all(r["helpers"] for r in results), results
    helpers = [pid for r in results for pid in r["helpers"]]
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in helpers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(pid) for pid in helpers), f"helper processes left behind: {helpers}"


def test_daemonic_process_gets_a_clear_error(monkeypatch, tmp_path):
    class _Daemonic:
        daemon = True
        name = "SomeDaemon-1"

    monkeypatch.setattr(runtime_checkpoint.multiprocessing, "current_process", lambda: _Daemonic())
    with pytest.raises(RuntimeError, match="SomeDaemon-1.*is daemonic.*daemon=False"):
        save_sharded({}, str(tmp_path))


def test_convert_exposes_the_public_save():
    from megatron_rcpa.convert import checkpoint

    assert "save_sharded" in checkpoint.__all__ and callable(checkpoint.save_sharded)
    assert not hasattr(checkpoint, "_synchronous_writer")
