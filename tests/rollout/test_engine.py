"""RolloutEngine directly, on a tiny megatron text-LM policy (one gloo process, fp32): G rows per prompt in
prompt order, forced prefixes verbatim, EOS and stop strings end a row, banned tokens are never drawn, the
sampled log-probs equal a teacher-forced recompute through the full forward, the draw is a function of
(seed, step, data-parallel rank), chunking by ``max_rows`` changes nothing for greedy-like sampling, and bad
prefixes are refused."""

from __future__ import annotations

import pytest
import torch

from megatron_rcpa.testing import run_distributed

pytestmark = [pytest.mark.multiproc, pytest.mark.megatron]

VOCAB = 40
EOS = 3


def _policy():
    import transformers

    from megatron_rcpa.models.text_lm import build_text_policy
    from megatron_rcpa.testing.models import init_global_weights

    hf = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    policy = build_text_policy(hf)
    init_global_weights(policy.language_model, seed=7)
    return policy.eval()


DECODE = ["static"]  # set per worker: the engine's decode path under test


def _engine(policy, *, stop=None, max_new=6, temperature=1.0, top_p=1.0, banned=(), max_rows=64, seed=0):
    from megatron_rcpa.rollout.engine import RolloutEngine, SamplingParams
    from megatron_rcpa.rollout.sampling import StopChecker

    return RolloutEngine(policy, vocab_size=VOCAB, pad_id=0, stop=stop or StopChecker([EOS]),
                         params=SamplingParams(temperature, top_p, max_new), seed=seed, max_rows=max_rows,
                         banned_token_ids=banned, decode=DECODE[0])


def _prompts():
    from megatron_rcpa.rollout.engine import PromptInput

    return [PromptInput(key="a", prompt_ids=[5, 6, 7, 8], reference_ids=[9, 10, 11, 12, EOS]),
            PromptInput(key="b", prompt_ids=[13, 14], reference_ids=[15, 16, EOS]),
            PromptInput(key="c", prompt_ids=[17, 18, 19, 20, 21, 22], reference_ids=[23, EOS])]


def engine_worker(decode: str):
    from megatron_rcpa.rollout.sampling import StopChecker

    DECODE[0] = decode
    policy = _policy()
    prompts = _prompts()
    out = {}
    ks = [2, 0, 1]
    rollouts = _engine(policy, max_new=6).generate(prompts, ks, group_size=3, step=4)
    out["rows"] = [(r.prompt_id, r.prompt_tokens, r.prefix_tokens, r.generated_tokens, r.rollout_logp, r.finished)
                   for r in rollouts]

    # the sampled log-probs are log softmax(logits / T)[token] of a full teacher-forced forward
    diffs = []
    for r in rollouts:
        seq = torch.tensor([r.prompt_tokens + r.prefix_tokens + r.generated_tokens])
        with torch.no_grad():
            logits = policy(input_ids=seq).float()[0, :, :VOCAB]
        start = len(r.prompt_tokens) + len(r.prefix_tokens)
        lp = torch.log_softmax(logits[start - 1:-1], dim=-1)
        recomputed = lp.gather(-1, torch.tensor(r.generated_tokens)[:, None]).squeeze(-1)
        diffs.append(float((recomputed - torch.tensor(r.rollout_logp)).abs().max()))
    out["max_logp_diff"] = max(diffs)

    # the same (seed, step, dp_rank) draws the same tokens; another step or rank draws others
    def tokens(**kw):
        return [r.generated_tokens for r in _engine(policy, max_new=6).generate(prompts, ks, group_size=3, **kw)]

    out["same"] = tokens(step=4) == [r[3] for r in out["rows"]]
    out["other_step"] = tokens(step=5) != [r[3] for r in out["rows"]]
    out["other_rank"] = tokens(step=4, dp_rank=1) != [r[3] for r in out["rows"]]

    # a near-greedy temperature: chunks of max_rows rows give the rows one big batch gives (left padding and
    # per-row positions are exact)
    def cold(max_rows):
        eng = _engine(policy, max_new=5, temperature=1e-4, max_rows=max_rows)
        return [r.generated_tokens for r in eng.generate(prompts, [0, 0, 0], group_size=2, step=0)]

    out["chunked"] = (cold(64), cold(2))

    # banned tokens are never drawn, even at a high temperature; top-p keeps only the nucleus
    banned = list(range(20, VOCAB))
    hot = _engine(policy, max_new=8, temperature=5.0, banned=banned).generate(prompts, [0, 0, 0], 4, step=1)
    out["banned_drawn"] = sorted({t for r in hot for t in r.generated_tokens if t in banned})
    nucleus = _engine(policy, max_new=8, temperature=1.0, top_p=1e-6).generate(prompts, [0, 0, 0], 2, step=2)
    out["nucleus_vs_cold"] = ([r.generated_tokens for r in nucleus],
                              [r.generated_tokens for r in _engine(policy, max_new=8, temperature=1e-4).generate(
                                  prompts, [0, 0, 0], 2, step=2)])

    # a stop string ends the row at the token that completed it (decode = the ids as letters)
    def decode(ids):
        return "".join(chr(ord("a") + (t % 26)) for t in ids)

    first = out["rows"][3][3]  # a completion of prompt b
    target = decode(first[:2])
    stopped = _engine(policy, stop=StopChecker([EOS], [target], decode), max_new=6).generate(prompts, ks, 3, step=4)
    out["stop"] = (first, stopped[3].generated_tokens, stopped[3].finished)

    try:
        _engine(policy).generate(prompts, [6, 0, 0], group_size=1, step=0)
        out["too_long"] = None
    except ValueError as exc:
        out["too_long"] = str(exc)
    return out


@pytest.mark.parametrize("decode", ["static", "reference"])
def test_rollout_engine_directly(decode):
    (out,) = run_distributed(engine_worker, args=(decode,), world_size=1, timeout=240.0)
    rows = out["rows"]
    prompts = _prompts()
    ks = [2, 0, 1]
    assert [r[0] for r in rows] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # G consecutive rows per prompt, prompt order
    for pid, prompt, prefix, gen, logp, finished in rows:
        assert prompt == prompts[pid].prompt_ids and prefix == prompts[pid].reference_ids[:ks[pid]]  # verbatim
        assert 1 <= len(gen) <= 6 and len(logp) == len(gen) and all(lp <= 0 for lp in logp)
        assert finished == (gen[-1] == EOS) and EOS not in gen[:-1]  # EOS ends a row and is kept
        assert finished or len(gen) == 6
    assert out["max_logp_diff"] <= 1e-5
    assert out["same"] and out["other_step"] and out["other_rank"]
    assert out["chunked"][0] == out["chunked"][1]
    assert out["banned_drawn"] == []
    assert out["nucleus_vs_cold"][0] == out["nucleus_vs_cold"][1]  # top-p -> 0 keeps only the argmax
    first, gen, finished = out["stop"]
    assert finished and gen == first[:len(gen)]  # the same draws, cut where the stop string was completed
    assert len(gen) == (1 if first[0] == EOS else 2)
    assert out["too_long"] is not None and "prompt 'a': forced prefix of 6 tokens but the reference has 5" in (
        out["too_long"])
