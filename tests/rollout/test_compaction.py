"""Compaction of the static decode path (megatron_rcpa/rollout/static_decode.py): at each host check the live
rows move to the smallest batch bucket that holds them. Checks, for a text LM and Qwen2.5-VL at TP1 and TP2:

* tokens and finished flags with compaction on == off, log-probs to fp32 rounding (sampled with a seed, and
  greedy), with rows ending at different steps (EOS ids, banned tokens, stop strings, prefixes of different
  lengths), over more than one chunk (the generator state handed to the next chunk is the same too); and == the
  reference per-token loop;
* compaction really shrinks the batch: the rows decoded summed over steps drop, and the buckets it moves
  through are the ones :func:`batch_buckets` lists;
* the bucket arithmetic.
"""

from __future__ import annotations

import pytest
from test_static_decode import _build, _decode_text, _engines, _prompts, _rows, _same_rollouts

pytestmark = [pytest.mark.megatron]

TIMEOUT = 600
MAX_NEW = 16
LOGP_TOL = 1e-5  # compaction on vs off (fp32; 5e-7 seen on a CPU, cuBLAS may pick kernels further apart)
EOS = list(range(20, 50))  # ~10% of the vocabulary: rows end at widely different steps


def _compare(policy, *, stop, params, banned, ks, group_size, max_rows, step, every=2, vocab_parallel=False):
    """(reference rows, compacted rows, uncompacted rows, stats on, stats off)."""
    kw = dict(stop=stop, params=params, banned=banned, max_rows=max_rows, every=every, vocab_parallel=vocab_parallel)
    ref_e, on_e = _engines(policy, **kw)
    _, off_e = _engines(policy, **kw)
    on_e.decode_stats, off_e.decode_stats = {}, {}
    off_e.compact = False
    prompts = _prompts(_compare.family, policy)
    ref = _rows(ref_e.generate(prompts, ks, group_size=group_size, step=step))
    on = _rows(on_e.generate(prompts, ks, group_size=group_size, step=step))
    off = _rows(off_e.generate(prompts, ks, group_size=group_size, step=step))
    return ref, on, off, on_e.decode_stats, off_e.decode_stats


def compaction_checks(family, tp_group=None):
    from megatron_rcpa.rollout.engine import SamplingParams
    from megatron_rcpa.rollout.sampling import StopChecker

    policy = _build(family)
    _compare.family = family
    structural = {"qwen2_5_vl": list(range(301 - 7, 301))}.get(family, [])
    out = {}
    # sampled: EOS, three prompts x G=4 with prefixes of 0 / 2 / 5 tokens; chunks of 8 then 4 rows
    out["eos"] = _compare(policy, stop=StopChecker(EOS), params=SamplingParams(max_new_tokens=MAX_NEW),
                          banned=structural, ks=[0, 2, 5], group_size=4, max_rows=8, step=1)
    # the same, sampling from each TP rank's logits shard (Gumbel-max over the whole chunk's noise rows)
    out["eos_vp"] = _compare(policy, stop=StopChecker(EOS), params=SamplingParams(max_new_tokens=MAX_NEW),
                             banned=structural, ks=[0, 2, 5], group_size=4, max_rows=8, step=1, vocab_parallel=True)
    # stop strings (host checks every 3 tokens), temperature / top-p, banned tokens; one chunk of 12 rows
    stop = StopChecker(EOS, stop_strings=["q"], decode=_decode_text)
    out["stop"] = _compare(policy, stop=stop, params=SamplingParams(temperature=0.8, top_p=0.9,
                                                                    max_new_tokens=MAX_NEW),
                           banned=structural + list(range(200, 260)), ks=[1, 4, 0], group_size=4, max_rows=12,
                           step=2, every=3)
    # the same checked every 8 tokens: rows that end on EOS between two checks after a stop string are cut at
    # the stop string (the reference's end), not at their EOS
    out["stop8"] = _compare(policy, stop=stop, params=SamplingParams(temperature=0.8, top_p=0.9,
                                                                     max_new_tokens=MAX_NEW),
                            banned=structural + list(range(200, 260)), ks=[1, 4, 0], group_size=4, max_rows=12,
                            step=2, every=8)
    # greedy
    out["greedy"] = _compare(policy, stop=StopChecker(EOS + list(range(100, 110))),
                             params=SamplingParams(max_new_tokens=MAX_NEW, greedy=True), banned=structural,
                             ks=[0, 3, 1], group_size=4, max_rows=12, step=3)
    return out


def tp1_worker(families):
    return {f: compaction_checks(f) for f in families}


def tp2_worker(families):
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    return {"rank": ps.get_tensor_model_parallel_rank(), **{f: compaction_checks(f, group) for f in families}}


FAMILIES = ("llama", "qwen2_5_vl")
CASES = ("eos", "eos_vp", "stop", "stop8", "greedy")


def _check(res, tol):
    for case in CASES:
        ref, on, off, stats_on, stats_off = res[case]
        # compaction changes no token and no finished flag; the log-probs agree to fp32 rounding only: a GEMM's
        # result for a row depends on how many rows it multiplies at once (CPU BLAS and cuBLAS pick kernels by
        # shape), so decoding 4 rows instead of 8 moves the last bits
        _same_rollouts(off, on, LOGP_TOL)
        _same_rollouts(ref, on, tol)  # and both are the reference loop's rollouts
        lengths = {len(r[2]) for r in on}
        assert len(lengths) > (1 if case == "greedy" else 2), (case, lengths)  # rows ended at different steps
        # off: every decode step runs the whole chunk; on: fewer rows decoded, through smaller buckets
        assert stats_off["row_steps"] > stats_on["row_steps"] > 0, (case, stats_on, stats_off)
        assert not stats_off["compactions"] and stats_on["compactions"], case
        for _step, before, after in stats_on["compactions"]:
            assert after < before
    # the chunk of 8 rows and the one of 4 each shrink through power-of-two buckets
    assert res["eos"][3]["chunks"] == 2 and res["eos"][3]["rows"] == 12
    assert any(r[4] and "q" in _decode_text(r[2]) for r in res["stop"][1])  # stop strings ended rows


@pytest.mark.multiproc
def test_compaction_changes_no_token_tp1():
    from megatron_rcpa.testing.launcher import run_distributed

    res = run_distributed(tp1_worker, world_size=1, args=(FAMILIES,), timeout=TIMEOUT)[0]
    for family in FAMILIES:
        _check(res[family], 1e-5)


@pytest.mark.multiproc
def test_compaction_changes_no_token_tp2():
    from megatron_rcpa.testing.launcher import run_distributed

    ranks = run_distributed(tp2_worker, world_size=2, tp=2, args=(FAMILIES,), timeout=TIMEOUT)
    for family in FAMILIES:
        a, b = ranks[0][family], ranks[1][family]
        _check(a, 1e-5)
        for case in CASES:
            assert a[case][1] == b[case][1]  # both TP ranks: the same rows and the same compactions
            assert a[case][3] == b[case][3]


def test_batch_buckets():
    from megatron_rcpa.rollout.static_decode import _bucket_for, batch_buckets

    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [8, 4, 2, 1]
    assert batch_buckets(12) == [12, 8, 4, 2, 1]
    assert batch_buckets(64) == [64, 32, 16, 8, 4, 2, 1]
    assert [_bucket_for(n, 12) for n in (0, 1, 2, 3, 5, 8, 9, 12)] == [1, 1, 2, 4, 8, 8, 12, 12]
