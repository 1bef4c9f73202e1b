"""init_distributed / ParallelGroups / teardown: in this process (one rank) and at TP2 and PP2 (launcher)."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_rcpa.runtime import cpu_shim
from megatron_rcpa.runtime.launcher import run_distributed
from megatron_rcpa.runtime.parallel import ParallelGroups, init_distributed, model_parallel_is_initialized, teardown
from megatron_rcpa.runtime.threads import usable_cores

pytestmark = pytest.mark.megatron

_FIELDS = ("rank", "world_size", "tp_rank", "tp_size", "pp_rank", "pp_size", "dp_rank", "dp_size", "cp_size",
           "is_first_stage", "is_last_stage", "pp_first_rank", "pp_last_rank", "pp_next_rank", "pp_prev_rank")


def _from_megatron() -> dict:
    """The same facts, asked of parallel_state directly (what ParallelGroups must match)."""
    from megatron.core import parallel_state as ps

    return dict(
        rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
        cp_size=ps.get_context_parallel_world_size(),
        is_first_stage=ps.is_pipeline_first_stage(), is_last_stage=ps.is_pipeline_last_stage(),
        pp_first_rank=ps.get_pipeline_model_parallel_first_rank(),
        pp_last_rank=ps.get_pipeline_model_parallel_last_rank(),
        pp_next_rank=ps.get_pipeline_model_parallel_next_rank(),
        pp_prev_rank=ps.get_pipeline_model_parallel_prev_rank(),
    )


def _check_groups(g: ParallelGroups) -> dict:
    """Compare a ParallelGroups with parallel_state, groups by membership; return what the parent checks."""
    from megatron.core import parallel_state as ps

    ranks = torch.distributed.get_process_group_ranks
    assert g.as_dict() == _from_megatron()
    assert ranks(g.tp_group) == ranks(ps.get_tensor_model_parallel_group())
    assert ranks(g.pp_group) == ranks(ps.get_pipeline_model_parallel_group())
    assert ranks(g.dp_group) == ranks(ps.get_data_parallel_group())
    assert ranks(g.mp_group) == ranks(ps.get_model_parallel_group())
    return {**g.as_dict(), "tp_members": ranks(g.tp_group), "pp_members": ranks(g.pp_group),
            "dp_members": ranks(g.dp_group), "mp_members": ranks(g.mp_group)}


def _tp2_worker():
    from megatron.core import parallel_state as ps

    out = _check_groups(ParallelGroups.from_parallel_state())
    out["threads"] = torch.get_num_threads()  # run_distributed(cpu_threads=3)
    # asking again for another layout is an error, and leaves the launcher's state alone
    try:
        init_distributed(1, 1, seed=0)
    except ValueError as exc:
        out["relayout_error"] = str(exc)
    out["still_initialised"] = ps.model_parallel_is_initialized() and torch.distributed.is_initialized()
    return out


def _pp2_worker():
    from megatron_rcpa.train.config import load_config
    from megatron_rcpa.train.trainer import init_parallel

    out = {"auto_threads": torch.get_num_threads()}  # OMP_NUM_THREADS unset: usable cores / 2 ranks
    cfg = load_config(None, ["parallel.pp=2", "run.cpu_threads=3"])
    groups = init_parallel(cfg)  # the trainer's set-up delegates to init_distributed: state kept, threads set
    out["trainer_threads"] = torch.get_num_threads()
    out.update(_check_groups(groups))
    return out


@pytest.mark.multiproc
def test_parallel_groups_at_tp2_match_parallel_state():
    results = run_distributed(_tp2_worker, world_size=2, tp=2, cpu_threads=3)
    for rank, r in enumerate(results):
        assert (r["rank"], r["tp_rank"], r["tp_size"], r["pp_size"], r["dp_size"]) == (rank, rank, 2, 1, 1)
        assert r["is_first_stage"] and r["is_last_stage"] and r["pp_last_rank"] == rank
        assert r["tp_members"] == [0, 1] and r["pp_members"] == [rank] and r["dp_members"] == [rank]
        assert r["mp_members"] == [0, 1]
        assert r["threads"] == 3
        if not torch.cuda.is_available():
            assert "already initialised with tp x pp = 2 x 1, but tp x pp = 1 x 1" in r["relayout_error"]
        assert r["still_initialised"]


@pytest.mark.multiproc
def test_parallel_groups_at_pp2_match_parallel_state_and_the_trainer_uses_them(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # spawned workers inherit this environment
    results = run_distributed(_pp2_worker, world_size=2, pp=2)
    for rank, r in enumerate(results):
        assert (r["rank"], r["pp_rank"], r["pp_size"], r["tp_size"], r["dp_size"]) == (rank, rank, 2, 1, 1)
        assert (r["is_first_stage"], r["is_last_stage"]) == (rank == 0, rank == 1)
        assert (r["pp_first_rank"], r["pp_last_rank"], r["pp_next_rank"], r["pp_prev_rank"]) == (0, 1, 1 - rank,
                                                                                              1 - rank)
        assert r["pp_members"] == [0, 1] and r["tp_members"] == [rank] and r["mp_members"] == [0, 1]
        if not torch.cuda.is_available():
            assert r["auto_threads"] == max(1, usable_cores() // 2)
            assert r["trainer_threads"] == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path (shim, gloo, threads)")
def test_single_process_init_and_teardown(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert not torch.distributed.is_initialized() and not cpu_shim.is_cpu_shim_installed()
    threads = torch.get_num_threads()
    try:
        groups = init_distributed(1, 1, seed=7, cpu_threads=1, timeout_s=60)
        assert torch.get_num_threads() == 1
        assert cpu_shim.is_cpu_shim_installed() and torch.distributed.get_backend() == "gloo"
        assert groups.as_dict() == _from_megatron()
        assert (groups.world_size, groups.tp_size, groups.pp_size, groups.dp_size) == (1, 1, 1, 1)
        assert ParallelGroups.current().as_dict() == groups.as_dict()
        first = torch.rand(3)
        torch.manual_seed(7)
        assert torch.equal(first, torch.rand(3)), "init_distributed seeds torch"
        with pytest.raises(ValueError, match=r"world size 1 is not a multiple of parallel.tp x parallel.pp = 2 x 1"):
            init_distributed(2, 1, seed=7)
        assert model_parallel_is_initialized(), "a failed second call must not undo the first"
    finally:
        teardown()
        torch.set_num_threads(threads)
    assert not torch.distributed.is_initialized() and not cpu_shim.is_cpu_shim_installed()
    assert not model_parallel_is_initialized() and ParallelGroups.current() is None
    with pytest.raises(RuntimeError, match="init_distributed"):
        ParallelGroups.from_parallel_state()
    teardown()  # nothing left to undo


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="tp = 0"):
        init_distributed(0, 1, seed=0)
    with pytest.raises(ValueError, match="timeout_s"):
        init_distributed(1, 1, seed=0, timeout_s=0)
    with pytest.raises(ValueError, match="together"):
        init_distributed(1, 1, seed=0, rank=0)
    assert not torch.distributed.is_initialized() and "RANK" not in os.environ
