"""The static decode path at PP = 2 (megatron_rcpa/rollout/static_pipeline.py: rows split into micro-batches
that move through the stages in a pipeline) against the reference rollout loop at PP = 2 (megatron's schedule,
the last stage samples and broadcasts) and against the static path at PP = 1, on tiny fp32 policies of every
family with layout-invariant weights (the same global tensors at PP = 1 and PP = 2):

* sampled rollouts with a fixed seed (EOS ending rows early, so chunks stop early and the stop marker runs; stop
  strings checked every 3 tokens; top-p, temperature, banned tokens; forced prefixes; left padding; three chunks):
  identical tokens / finished flags and log-probs within 1e-5 of the reference at PP = 2, identical tokens to
  the static path at PP = 1, on both stages;
* 1 micro-batch, 4 uneven micro-batches and vocab-parallel (Gumbel-max) sampling: the same tokens;
* greedy and one-token rollouts: the reference's tokens;
* the first stage encodes each prompt's images once (not once per rollout); images that do not fit the prompt
  (only the first stage can tell) make every stage raise instead of leaving the others waiting;
* rollout log-probs == the teacher-forced recompute of the training forward (at PP = 1) <= 1e-5.

Spawns: PP = 2 (all families), then PP = 1 (baseline and recompute of the PP = 2 rows); TP2 x PP2 (two families);
PP = 4 (a text LM: the middle stages); the bubble benchmark at its quick size.
"""

from __future__ import annotations

import pytest
import torch
from test_static_decode import _family_policy, _prompts  # the same models and prompts as at PP = 1

pytestmark = [pytest.mark.megatron, pytest.mark.multiproc]

TIMEOUT = 600
VOCAB = 301
MAX_NEW = 10
EOS = list(range(20, 80))  # ~20% of the vocabulary: rows end at different steps, chunks often end early
FAMILIES = ("llama", "qwen2", "qwen2_5_vl", "llava")
STRUCTURAL = {"qwen2_5_vl": list(range(VOCAB - 7, VOCAB)), "llava": [VOCAB - 1]}


def _decode_text(ids):
    return "".join(chr(97 + i % 26) for i in ids)


def _build(family):
    """A tiny policy (4 decoder layers) with weights that depend only on the global parameter names."""
    from megatron_rcpa.runtime.weights import init_global_weights, init_replicated_by_name

    policy = _family_policy(family, num_layers=4)
    init_global_weights(policy.language_model, seed=3, std=0.08)
    if family == "qwen2_5_vl" and policy.vision_model is not None:
        init_replicated_by_name(policy.vision_model, seed=4, std=0.05)
    if family == "llava" and policy.vision_model is not None:
        init_global_weights(policy.vision_model, seed=4, std=0.05)
        init_global_weights(policy.vision_projection, seed=5, std=0.05)
    return policy.eval()


class _VocabParallelEngine:  # marker mix-in: the engine reads these attributes
    vocab_parallel_sampling = True


def _engine(policy, decode, *, stop, params, banned=(), max_rows=2, every=3, micro=None, vocab_parallel=False):
    from megatron_rcpa.rollout.engine import RolloutEngine

    cls = type("VP", (_VocabParallelEngine, RolloutEngine), {}) if vocab_parallel else RolloutEngine
    return cls(policy, vocab_size=policy.vocab_size, pad_id=0, stop=stop, params=params, seed=5, max_rows=max_rows,
               banned_token_ids=banned, decode=decode, stop_check_every=every, pp_microbatches=micro)


def _rows(rollouts):
    return [(r.prompt_id, r.prefix_tokens, r.generated_tokens, r.rollout_logp, r.finished) for r in rollouts]


# the sampled settings compared across paths: (name, stop, params kwargs, banned, max_rows, every, prefixes, step)
def _settings(family):
    from megatron_rcpa.rollout.sampling import StopChecker

    structural = STRUCTURAL.get(family, [])
    return [
        ("eos", StopChecker(EOS), dict(max_new_tokens=MAX_NEW), structural, 2, 3, [0, 3, 6], 1),
        ("stop", StopChecker((), stop_strings=["q"], decode=_decode_text),
         dict(temperature=0.7, top_p=0.8, max_new_tokens=MAX_NEW), list(range(150, VOCAB)), 6, 3, [0, 1, 2], 2),
        ("every1", StopChecker(EOS), dict(max_new_tokens=MAX_NEW), structural, 6, 1, [2, 0, 4], 3),
    ]


def pp_worker(families, decodes):
    """Every setting through the given decode paths on this layout; returns {family: {key: rows}}."""
    from megatron_rcpa.rollout.engine import SamplingParams
    from megatron_rcpa.rollout.sampling import StopChecker

    out = {}
    for family in families:
        policy = _build(family)
        prompts = _prompts(family, policy)
        res = {}
        seen, current = {}, [None]  # image inputs the vision tower (first stage) encoded, per decode path

        def count(_module, args, seen=seen, current=current):
            seen[current[0]] = seen.get(current[0], 0) + args[0].shape[0]

        hook = None
        if getattr(policy, "vision_model", None) is not None:
            hook = policy.vision_model.register_forward_pre_hook(count)
        for name, stop, kw, banned, max_rows, every, ks, step in _settings(family):
            for decode in decodes:
                current[0] = (name, decode)
                eng = _engine(policy, decode, stop=stop, params=SamplingParams(**kw), banned=banned,
                              max_rows=max_rows, every=every)
                res[(name, decode)] = _rows(eng.generate(prompts, ks, group_size=2, step=step))
        if hook is not None:
            hook.remove()
        res["vision_inputs"] = seen
        # one micro-batch and vocab-parallel sampling on the EOS setting (chunks of 2 rows); 4 uneven micro-batches
        # (2, 2, 1, 1 rows) on the every-token-check setting (one chunk of 6 rows)
        for key, setting, extra in (("micro1", 0, dict(micro=1)), ("vocab_parallel", 0, dict(vocab_parallel=True)),
                                    ("micro4", 2, dict(micro=4))):
            name, stop, kw, banned, max_rows, every, ks, step = _settings(family)[setting]
            eng = _engine(policy, "static", stop=stop, params=SamplingParams(**kw), banned=banned, max_rows=max_rows,
                          every=every, **extra)
            res[key] = _rows(eng.generate(prompts, ks, group_size=2, step=step))
        for decode in decodes:
            eng = _engine(policy, decode, stop=StopChecker(), params=SamplingParams(max_new_tokens=MAX_NEW,
                                                                                    greedy=True),
                          banned=STRUCTURAL.get(family, []), max_rows=6)
            res[("greedy", decode)] = _rows(eng.generate(prompts, [0, 0, 0], group_size=2, step=0))
            eng = _engine(policy, decode, stop=StopChecker(EOS), params=SamplingParams(max_new_tokens=1),
                          banned=STRUCTURAL.get(family, []), max_rows=6, every=1)
            res[("one_token", decode)] = _rows(eng.generate(prompts, [1, 0, 0], group_size=2, step=4))
        res["references"] = [p.reference_ids for p in prompts]
        if family == "llava":
            res["refusal"] = _refusal(policy, prompts)
        out[family] = res
    return out


def _refusal(policy, prompts):
    """Images that do not fit the prompt: only the first stage can tell; every stage must raise, none hang."""
    from megatron_rcpa.rollout.batch import left_pad
    from megatron_rcpa.rollout.static_pipeline import pipeline_generate
    from megatron_rcpa.runtime.parallel import ParallelGroups

    groups = ParallelGroups.from_parallel_state()
    if groups.pp_size == 1:
        return None
    ids, mask = left_pad([prompts[0].prompt_ids], 0)
    try:
        pipeline_generate(policy, ids, mask, groups=groups, pixel_values=torch.cat([prompts[0].pixel_values] * 2),
                          max_new_tokens=3, pad_id=0, vocab_size=policy.vocab_size)
    except Exception as exc:  # noqa: BLE001 - returned to the test
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def pp1_worker(families, pp2_rows):
    """PP = 1: the static path's rows, and the teacher-forced log-probs of the PP = 2 rows."""
    from megatron_rcpa.models.inference import gather_vocab_logits

    out = pp_worker(families, ("static",))
    for family in families:
        policy = _build(family)
        prompts = _prompts(family, policy)
        structural = STRUCTURAL.get(family, [])
        worst = 0.0
        for key in (("eos", "static"), ("every1", "static")):
            for pid, prefix, gen_tokens, lps, _f in pp2_rows[family][key]:
                p = prompts[pid]
                ids = torch.tensor([p.prompt_ids + prefix + gen_tokens])
                kw = {k: getattr(p, k) for k in ("pixel_values", "image_grid_thw") if getattr(p, k) is not None}
                with torch.no_grad():
                    logits = gather_vocab_logits(policy(input_ids=ids, **kw), policy.vocab_size)[0].float()
                n = len(p.prompt_ids) + len(prefix)
                full = logits[n - 1: n - 1 + len(gen_tokens)]
                full[:, structural] = float("-inf")
                tf = torch.log_softmax(full, -1)[torch.arange(len(gen_tokens)), torch.tensor(gen_tokens)]
                worst = max(worst, (tf - torch.tensor(lps)).abs().max().item())
        out[family]["teacher_forced_err"] = worst
    return out


def _same_rollouts(ref, new, tol=1e-5):
    assert len(ref) == len(new)
    for a, b in zip(ref, new):
        assert a[0] == b[0] and a[1] == b[1]  # prompt, forced prefix
        assert a[2] == b[2], (a, b)  # generated tokens
        assert a[4] == b[4]  # finished
        assert len(a[3]) == len(b[3]) and max([abs(x - y) for x, y in zip(a[3], b[3])] or [0.0]) <= tol


@pytest.fixture(scope="module")
def runs():
    from megatron_rcpa.testing.launcher import run_distributed

    pp2 = run_distributed(pp_worker, world_size=2, pp=2, args=(FAMILIES, ("static", "reference")), timeout=TIMEOUT)
    pp1 = run_distributed(pp1_worker, world_size=1, args=(FAMILIES, pp2[1]), timeout=TIMEOUT)[0]
    return pp2, pp1


@pytest.mark.parametrize("family", FAMILIES)
def test_pp2_static_decode_matches_reference_and_pp1(runs, family):
    (first, last), pp1 = runs
    res, base = last[family], pp1[family]
    for name in ("eos", "stop", "every1", "greedy", "one_token"):
        new = res[(name, "static")]
        _same_rollouts(res[(name, "reference")], new)  # the reference loop at PP = 2
        assert new == first[family][(name, "static")]  # both stages return the same rollouts
        assert [r[2] for r in new] == [r[2] for r in base[(name, "static")]]  # the static path at PP = 1
        _same_rollouts(base[(name, "static")], new)
    eos = res[("eos", "static")]
    assert any(r[4] for r in eos) and any(len(r[2]) < MAX_NEW for r in eos)  # EOS ended rows early
    assert any(r[4] and "q" in _decode_text(r[2]) for r in res[("stop", "static")])  # stop strings ended rows
    assert all(t < 150 for r in res[("stop", "static")] for t in r[2])  # banned tokens never drawn
    for pid, prefix, *_ in eos:  # forced prefixes verbatim
        assert prefix == res["references"][pid][: [0, 3, 6][pid]]
    _same_rollouts(eos, res["micro1"])  # one micro-batch: the same rollouts
    _same_rollouts(res[("every1", "static")], res["micro4"])  # 4 uneven micro-batches: the same rollouts
    if family == "llava":  # images that do not fit the prompt: stage 0 says why, stage 1 stops too (no hang)
        assert first[family]["refusal"].startswith("ValueError") and "image" in first[family]["refusal"]
        assert "another pipeline stage refused" in last[family]["refusal"]
    if family in ("qwen2_5_vl", "llava"):  # stage 0 encodes each prompt's images once, not once per rollout (G=2)
        seen = first[family]["vision_inputs"]
        assert seen[("eos", "reference")] == 2 * seen[("eos", "static")] > 0
    _same_rollouts(eos, res["vocab_parallel"])  # Gumbel-max on the (single) logits shard: the same draws
    assert base["teacher_forced_err"] <= 1e-5


def test_tp2pp2_static_decode_matches_reference():
    """TP2 x PP2 (4 ranks): the pipeline path's rollouts equal the reference loop's on every rank."""
    from megatron_rcpa.testing.launcher import run_distributed

    families = ("llama", "qwen2_5_vl")  # (the tiny qwen2 has one KV head: TP=2 cannot split it)
    ranks = run_distributed(pp_worker, world_size=4, tp=2, pp=2, args=(families, ("static", "reference")),
                            timeout=TIMEOUT)
    for family in families:
        last = ranks[-1][family]
        for name in ("eos", "stop", "every1", "greedy", "one_token"):
            _same_rollouts(last[(name, "reference")], last[(name, "static")])
            assert all(r[family][(name, "static")] == last[(name, "static")] for r in ranks)  # every rank
        _same_rollouts(last[("eos", "static")], last["micro1"])
        _same_rollouts(last[("every1", "static")], last["micro4"])
        _same_rollouts(last[("eos", "static")], last["vocab_parallel"])  # Gumbel-max over the two logits shards


def test_bench_pipeline_quick_runs_and_writes_json(tmp_path):
    """bench/bench_pipeline.py --quick (PP = 2 on a CPU): busy / wall per stage for 1 and 2 micro-batches,
    the same tokens in both."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, os.path.join(root, "bench", "bench_pipeline.py"), "--quick", "--batch", "4",
                           "--prompt", "8", "--steps", "6", "--repeats", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (name,) = [n for n in os.listdir(tmp_path) if n.startswith("bench_pipeline_")]
    with open(tmp_path / name) as f:
        data = json.load(f)
    assert data["tokens_equal"] is True
    assert data["reference"]["wall_s"] > 0  # the reference loop timed on the same rows
    assert [r["microbatches"] for r in data["results"]] == [1, 2]
    for r in data["results"]:
        assert [s["stage"] for s in r["stages"]] == [0, 1]
        for s in r["stages"]:
            assert 0 < s["busy_s"] <= s["wall_s"] and abs(s["bubble"] + s["busy_fraction"] - 1) < 1e-9


def test_pp4_middle_stages_relay():
    """PP = 4 (one layer a stage): two middle stages relay hidden states and the stop marker; 4 micro-batches by
    default, 1 and 4 uneven ones too: the reference loop's rollouts on every stage."""
    from megatron_rcpa.testing.launcher import run_distributed

    ranks = run_distributed(pp_worker, world_size=4, pp=4, args=(("llama",), ("static", "reference")),
                            timeout=TIMEOUT)
    last = ranks[-1]["llama"]
    for name in ("eos", "stop", "every1", "greedy", "one_token"):
        _same_rollouts(last[(name, "reference")], last[(name, "static")])
        assert all(r["llama"][(name, "static")] == last[(name, "static")] for r in ranks)
    _same_rollouts(last[("eos", "static")], last["micro1"])
    _same_rollouts(last[("every1", "static")], last["micro4"])
