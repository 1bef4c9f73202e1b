"""Intra-op CPU threads: explicit value > OMP_NUM_THREADS > usable cores / local ranks; run.cpu_threads."""

from __future__ import annotations

import pytest
import torch

from megatron_rcpa.runtime import threads
from megatron_rcpa.runtime.threads import resolve_cpu_threads, set_cpu_threads, usable_cores
from megatron_rcpa.train.config import RunConfig, load_config


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    return monkeypatch


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_explicit_value_wins(clean_env):
    clean_env.setenv("OMP_NUM_THREADS", "4")
    assert resolve_cpu_threads(3, local_world_size=2) == 3


def test_omp_num_threads_wins_over_the_automatic_count(clean_env):
    clean_env.setenv("OMP_NUM_THREADS", "1")
    assert resolve_cpu_threads(None, local_world_size=1) == 1


def test_automatic_count_is_cores_over_local_ranks(clean_env):
    clean_env.setattr(threads, "usable_cores", lambda: 16)
    assert resolve_cpu_threads(None, local_world_size=4) == 4
    assert resolve_cpu_threads(None, local_world_size=32) == 1  # never below one
    clean_env.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun's processes on this node
    assert resolve_cpu_threads() == 2
    clean_env.delenv("LOCAL_WORLD_SIZE")
    assert resolve_cpu_threads() == 16
    assert 1 <= usable_cores()


def test_bad_values_name_their_source(clean_env):
    with pytest.raises(ValueError, match=r"run.cpu_threads = 0: expected an integer >= 1"):
        resolve_cpu_threads(0)
    clean_env.setenv("OMP_NUM_THREADS", "lots")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS = 'lots'"):
        resolve_cpu_threads()
    clean_env.delenv("OMP_NUM_THREADS")
    clean_env.setenv("LOCAL_WORLD_SIZE", "x")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE = 'x'"):
        resolve_cpu_threads()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the CPU pool is left alone")
def test_set_cpu_threads_sets_torch(clean_env, restore_threads):
    torch.set_num_threads(2)
    assert set_cpu_threads(1) == 1 and torch.get_num_threads() == 1


def test_set_cpu_threads_leaves_cuda_runs_alone(clean_env, restore_threads):
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    before = torch.get_num_threads()
    assert set_cpu_threads(before + 1) is None and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="run.cpu_threads"):
        set_cpu_threads(-1)  # still checked


def test_run_cpu_threads_config():
    assert RunConfig().cpu_threads is None
    assert load_config(None, ["run.cpu_threads=3"]).run.cpu_threads == 3
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="cpu_threads"):
            RunConfig(cpu_threads=bad)
