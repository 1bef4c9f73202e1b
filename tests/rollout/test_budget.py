"""rollout.max_rows = auto (megatron_rcpa/rollout/budget.py): the KV-cache bytes per row of a built tiny policy
at TP1 / TP2 against the formula and against what the static decoder really allocates; the engine's chunk from a
budget (whole groups, the minimum over the TP ranks, an error naming rollout.kv_cache_gb below one group); auto
chunks give the rollouts the same fixed max_rows gives; the CPU default budget."""

from __future__ import annotations

import pytest
import torch
from test_static_decode import _build, _prompts, _rows

pytestmark = [pytest.mark.megatron]

TIMEOUT = 600


def budget_worker():
    from megatron.core import parallel_state as ps

    from megatron_rcpa.rollout.budget import CPU_KV_CACHE_GB, GB, cache_length, kv_bytes_per_row
    from megatron_rcpa.rollout.engine import RolloutEngine, SamplingParams
    from megatron_rcpa.rollout.sampling import StopChecker
    from megatron_rcpa.rollout.static_decode import LENGTH_BUCKET, _State, decoder_for

    tp = ps.get_tensor_model_parallel_world_size()
    group = ps.get_tensor_model_parallel_group() if tp > 1 else None
    policy = _build("llama")  # 2 layers, 4 query heads, 2 KV heads of 16 dims, fp32
    out = {"tp": tp}
    length = cache_length(15, 10)
    out["length"] = length
    out["per_row"] = kv_bytes_per_row(policy, length)
    out["formula"] = 2 * 2 * (2 // tp) * 16 * length * 4
    state = _State(decoder_for(policy, group), 3, length, 10, torch.device("cpu"), torch.float32)
    out["allocated_per_row"] = sum(t.numel() * t.element_size() for t in state.k + state.v) // 3

    def engine(**kw):
        return RolloutEngine(policy, vocab_size=policy.vocab_size, pad_id=0, stop=StopChecker(list(range(20, 50))),
                             params=SamplingParams(max_new_tokens=10), seed=3, **kw)

    per_row = out["per_row"]
    # 5.5 rows of budget: 5 rows, 4 in whole groups of 2; widths up to 15 (+10 new) -> one 64-position bucket
    out["chunk"] = engine(kv_cache_gb=5.5 * per_row / GB).chunk_rows([9, 15, 3], 2)
    # at PP > 1 the static path (rollout/static_pipeline.py) allocates the same rounded-up cache: the same chunk
    real = engine().groups

    class AsPP2:  # this rank's groups, seen as one stage of a two-stage pipeline (chunk sizing only)
        pp_size = 2

        def __getattr__(self, name):
            return getattr(real, name)

    out["pp_chunk"] = engine(kv_cache_gb=5.5 * per_row / GB, groups=AsPP2()).chunk_rows([9, 15, 3], 2)
    # a longer prompt needs a longer cache: fewer rows from the same budget
    long_len = cache_length(100, 10)
    out["long"] = (long_len, engine(kv_cache_gb=5.5 * per_row / GB).chunk_rows([100], 1))
    # ranks with different budgets decode the same chunks: the smallest
    rank = ps.get_tensor_model_parallel_rank()
    out["min"] = engine(kv_cache_gb=(7.5 if rank == 0 else 3.5) * per_row / GB).chunk_rows([15], 1)
    try:
        engine(kv_cache_gb=1.5 * per_row / GB).chunk_rows([15], 2)
        out["too_small"] = None
    except ValueError as e:
        out["too_small"] = str(e)
    out["cpu_default"] = engine().kv_budget[0] == int(CPU_KV_CACHE_GB * GB)
    # auto chunks == the same fixed max_rows (3 prompts x G=2 = 6 rows: chunks of 4 and 2)
    prompts = _prompts("llama", policy)
    auto = engine(kv_cache_gb=4.5 * per_row / GB)
    fixed = engine(max_rows=4)
    widths = [len(p.prompt_ids) + k for p, k in zip(prompts, [0, 2, 1])]
    out["auto_chunk"] = auto.chunk_rows(widths, 2)
    out["same_rollouts"] = (_rows(auto.generate(prompts, [0, 2, 1], group_size=2, step=1))
                            == _rows(fixed.generate(prompts, [0, 2, 1], group_size=2, step=1)))
    out["logged"] = dict(auto._auto_rows_logged)
    out["bucket"] = LENGTH_BUCKET
    return out


def _check(res):
    assert res["per_row"] == res["formula"] == res["allocated_per_row"]
    assert res["length"] == res["bucket"]  # 15 + 10 rounded up to the cache bucket
    assert res["chunk"] == 4 and res["pp_chunk"] == 4
    long_len, long_rows = res["long"]
    assert long_rows == int(5.5 * res["length"] // long_len) and long_rows < 5
    assert res["too_small"] is not None and "rollout.kv_cache_gb" in res["too_small"] and \
        "fewer than one group of rcpa.group_size = 2" in res["too_small"]
    assert res["cpu_default"]
    assert res["auto_chunk"] == 4 and res["same_rollouts"]
    assert res["logged"] == {res["length"]: 4}


@pytest.mark.multiproc
def test_auto_max_rows_from_the_kv_cache_budget_tp1():
    from megatron_rcpa.testing.launcher import run_distributed

    res = run_distributed(budget_worker, world_size=1, timeout=TIMEOUT)[0]
    _check(res)
    assert res["min"] == 7


@pytest.mark.multiproc
def test_auto_max_rows_from_the_kv_cache_budget_tp2():
    from megatron_rcpa.testing.launcher import run_distributed

    ranks = run_distributed(budget_worker, world_size=2, tp=2, timeout=TIMEOUT)
    for res in ranks:
        _check(res)
        assert res["min"] == 3  # rank 0's budget holds 7 rows, rank 1's 3: both decode 3
    assert ranks[0]["per_row"] == ranks[0]["formula"]  # half the KV heads of TP1's
