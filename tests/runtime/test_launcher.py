"""run_distributed: results by rank, worker failures, hangs, and the megatron process grid."""

from __future__ import annotations

import os
import time

import pytest
import torch

from megatron_rcpa.runtime.launcher import (
    DistributedTimeoutError,
    DistributedWorkerError,
    RankInfo,
    rank_info,
    run_distributed,
)

pytestmark = [pytest.mark.multiproc, pytest.mark.megatron]


# Workers must be module-level functions: they are pickled by name into spawned processes.
def _sum_ranks(scale: float, *, offset: float = 0.0):
    t = torch.tensor([float(torch.distributed.get_rank() + 1)])
    torch.distributed.all_reduce(t)
    return {"info": rank_info(), "sum": t * scale + offset, "cuda_tensor": torch.ones(2, device="cuda")}


def _raise_on_rank_1():
    if torch.distributed.get_rank() == 1:
        raise ValueError("boom on purpose")
    torch.distributed.barrier()  # rank 0 would wait here forever without the parent killing it
    return "unreachable"


def _exit_on_rank_1():
    if torch.distributed.get_rank() == 1:
        os._exit(3)
    torch.distributed.barrier()


def _sleep_forever_on_rank_1():
    if torch.distributed.get_rank() == 1:
        while True:
            time.sleep(0.1)
    return "rank 0 is done"


def _grid():
    return rank_info()


def test_results_come_back_by_rank_with_dp():
    results = run_distributed(_sum_ranks, world_size=2, args=(10.0,), kwargs={"offset": 1.0})
    assert [r["info"].rank for r in results] == [0, 1]
    for r in results:
        assert torch.equal(r["sum"], torch.tensor([31.0]))  # (1 + 2) * 10 + 1, all-reduced over gloo
        assert r["cuda_tensor"].device.type == "cpu"  # the CPU shim is active in the workers
    assert [(r["info"].dp_rank, r["info"].dp_size, r["info"].tp_size, r["info"].pp_size)
            for r in results] == [(0, 2, 1, 1), (1, 2, 1, 1)]


def test_worker_exception_names_rank_and_carries_traceback():
    start = time.monotonic()
    with pytest.raises(DistributedWorkerError) as excinfo:
        run_distributed(_raise_on_rank_1, world_size=2, timeout=60)
    err = excinfo.value
    assert err.rank == 1
    assert "rank 1 of 2" in str(err)
    assert "ValueError: boom on purpose" in str(err) and "_raise_on_rank_1" in err.worker_traceback
    assert "Traceback (most recent call last)" in err.worker_traceback
    assert time.monotonic() - start < 50, "the other worker was not killed promptly (timeout is 60 s)"


def test_worker_that_dies_is_reported():
    with pytest.raises(DistributedWorkerError, match="exited with code 3") as excinfo:
        run_distributed(_exit_on_rank_1, world_size=2, timeout=60)
    assert excinfo.value.rank == 1


def test_hang_raises_timeout_naming_the_ranks():
    timeout = 20.0
    start = time.monotonic()
    with pytest.raises(DistributedTimeoutError) as excinfo:
        run_distributed(_sleep_forever_on_rank_1, world_size=2, timeout=timeout)
    elapsed = time.monotonic() - start
    assert timeout <= elapsed < timeout + 10, f"took {elapsed:.1f} s for a {timeout} s timeout"
    err = excinfo.value
    assert f"timed out after {timeout:g} s" in str(err)
    # On a heavily loaded machine start-up alone can outlast the timeout; then rank 0 is pending too.
    assert 1 in err.ranks and set(err.ranks) <= {0, 1}, str(err)
    assert f"ranks not finished: {err.ranks}" in str(err)
    if err.ranks == [1]:  # rank 0 finished, so rank 1 got past the collectives of the set-up: it is in fn
        assert "_sleep_forever_on_rank_1" in err.stacks[1], "the hung rank's stack should be reported"
        assert "where rank 1 was" in str(err)


def test_tp2_pp2_grid():
    infos = run_distributed(_grid, world_size=4, tp=2, pp=2)
    assert all(isinstance(i, RankInfo) for i in infos)
    # megatron's default order tp-cp-ep-dp-pp: tensor parallel ranks are adjacent, pipeline stages outermost
    assert [(i.rank, i.tp_rank, i.pp_rank, i.dp_rank) for i in infos] == [
        (0, 0, 0, 0), (1, 1, 0, 0), (2, 0, 1, 0), (3, 1, 1, 0)]
    assert {(i.tp_size, i.pp_size, i.dp_size, i.world_size) for i in infos} == {(2, 2, 1, 4)}


def test_arguments_are_checked_before_spawning():
    with pytest.raises(TypeError, match="module level"):
        run_distributed(lambda: 1, world_size=1)
    with pytest.raises(ValueError, match="multiple of"):
        run_distributed(_grid, world_size=3, tp=2)
    with pytest.raises(ValueError, match="timeout"):
        run_distributed(_grid, world_size=1, timeout=0)
