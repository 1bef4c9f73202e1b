"""The static-shape decode path (megatron_rcpa/rollout/static_decode.py) against the reference rollout loop
(RolloutEngine._generate_rows, megatron's KV cache) on tiny random fp32 policies of every family:

* sampled rollouts with a fixed seed: identical tokens / finished flags, log-probs within 1e-5, over two
  chunks (so the generator state handed back after an early all-rows-finished stop is the reference's too),
  with EOS ids, stop strings checked every k tokens, forced prefixes, left padding, banned tokens, top-p;
* greedy decoding == ``models.inference.greedy_generate``;
* rollout log-probs == a teacher-forced recompute through the policy's full forward (<= 1e-5); top-p and
  banned tokens honoured against that recompute;
* TP=2: identical tokens on both ranks and equal to the reference at TP=2;
* MRoPE: for generated text tokens Qwen2.5-VL's 3-D position is one position per row (max + 1 + t), and
  megatron's MultimodalRotaryEmbedding of it equals the 1-D cos/sin table the decode path reads.

Two spawns (TP1, TP2), all families in each.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.megatron]

TIMEOUT = 600
VOCAB = 301
MAX_NEW = 10
EOS = list(range(20, 80))  # ~20% of the vocabulary: rows end at different steps, chunks often end early


def _decode_text(ids):
    return "".join(chr(97 + i % 26) for i in ids)


# ------------------------------------------------------------------------------------------ builders
def _perturb(policy, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "norm" in name and "vision" not in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias") and "vision" not in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def _family_policy(family, num_layers=None):
    """A tiny policy of ``family`` at the current TP/PP layout (megatron's own init; ``num_layers`` decoder layers,
    default: the tiny configs' 2)."""
    layers = {} if num_layers is None else {"num_layers": num_layers}
    if family in ("llama", "qwen2"):
        import transformers

        from megatron_rcpa.models.text_lm import build_text_policy

        cls = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
        cfg = cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers or 2,
                  num_attention_heads=4, num_key_value_heads=2 if family == "llama" else 1,
                  max_position_embeddings=256, tie_word_embeddings=family == "qwen2",
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        return build_text_policy(cfg)
    if family == "qwen2_5_vl":
        from megatron_rcpa.models.qwen2_5_vl import build_qwen2_5_vl_policy
        from megatron_rcpa.models.tiny import tiny_qwen2_5_vl_config

        return build_qwen2_5_vl_policy(tiny_qwen2_5_vl_config(vocab_size=VOCAB, **layers))
    from megatron_rcpa.models.llava import build_llava_policy
    from megatron_rcpa.models.tiny import tiny_llava_config

    return build_llava_policy(tiny_llava_config(vocab_size=VOCAB, **layers))


def _build(family):
    """A tiny random policy of ``family`` at the current TP layout (megatron's init is TP-invariant)."""
    torch.manual_seed(0)
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(0)
    policy = _family_policy(family)
    _perturb(policy, seed=1)
    return policy.eval()


def _prompts(family, policy):
    """Three prompts of different lengths (left padding), with images for the VLMs, and references."""
    from megatron_rcpa.rollout.engine import PromptInput

    gen = torch.Generator().manual_seed(11)
    text = lambda n: torch.randint(100, 250, (n,), generator=gen).tolist()  # noqa: E731
    prompts = []
    for i, n in enumerate((5, 9, 7)):
        ref = text(6)
        if family == "qwen2_5_vl":
            img = policy.image_token_id
            vs, ve = img - 2, img - 1  # <|vision_start|>, <|vision_end|> in tiny_qwen2_5_vl_config
            grid = torch.tensor([[1, 4, 4 + 2 * (i % 2)]])
            n_img = int(grid.prod()) // 4
            ids = text(n) + [vs] + [img] * n_img + [ve] + text(2)
            pv = torch.randn(int(grid.prod()), 3 * 2 * 14 * 14, generator=gen)
            prompts.append(PromptInput(key=i, prompt_ids=ids, pixel_values=pv, image_grid_thw=grid, reference_ids=ref))
        elif family == "llava":
            per = policy.vision_dims.tokens_per_image
            ids = text(n) + [policy.image_token_id] * per + text(2)
            pv = torch.randn(1, 3, 28, 28, generator=gen)
            prompts.append(PromptInput(key=i, prompt_ids=ids, pixel_values=pv, reference_ids=ref))
        else:
            prompts.append(PromptInput(key=i, prompt_ids=text(n), reference_ids=ref))
    return prompts


def _engines(policy, *, stop, params, banned=(), max_rows=2, seed=5, every=3, vocab_parallel=False):
    from megatron_rcpa.rollout.engine import RolloutEngine
    from megatron_rcpa.rollout.static_decode import static_generate_rows

    class StaticEngine(RolloutEngine):
        vocab_parallel_sampling = vocab_parallel

        def _generate_rows(self, prompts, rows, gen, device):
            return static_generate_rows(self, prompts, rows, gen, device)

    kw = dict(vocab_size=policy.vocab_size, pad_id=0, stop=stop, params=params, seed=seed, max_rows=max_rows,
              banned_token_ids=banned, stop_check_every=every)
    # the reference: the engine's per-token loop (its default is the static path now)
    return RolloutEngine(policy, decode="reference", **kw), StaticEngine(policy, **kw)


def _rows(rollouts):
    return [(r.prompt_id, r.prefix_tokens, r.generated_tokens, r.rollout_logp, r.finished) for r in rollouts]


def _full_logits(policy, prompt, gen_tokens):
    """Teacher-forced last-vocab logits [len(gen), V] through the policy's full forward (no cache)."""
    ids = torch.tensor([prompt.prompt_ids + gen_tokens])
    kw = {}
    if prompt.pixel_values is not None:
        kw["pixel_values"] = prompt.pixel_values
    if prompt.image_grid_thw is not None:
        kw["image_grid_thw"] = prompt.image_grid_thw
    from megatron_rcpa.models.inference import gather_vocab_logits

    with torch.no_grad():
        logits = gather_vocab_logits(policy(input_ids=ids, **kw), policy.vocab_size)[0].float()
    n = len(prompt.prompt_ids)
    return logits[n - 1: n - 1 + len(gen_tokens)]


# ------------------------------------------------------------------------------------------- checks
def family_checks(family, tp_group=None):
    """Everything compared on one policy; returns plain data for the parent process."""
    from megatron_rcpa.models.inference import greedy_generate
    from megatron_rcpa.rollout.engine import PromptInput, SamplingParams
    from megatron_rcpa.rollout.sampling import StopChecker, top_p_filter
    from megatron_rcpa.rollout.static_decode import static_generate

    policy = _build(family)
    prompts = _prompts(family, policy)
    out = {}
    # never sampled: the VLMs' image (and Qwen2.5-VL's other special) tokens, as the trainer bans them
    structural = {"qwen2_5_vl": list(range(VOCAB - 7, VOCAB)), "llava": [VOCAB - 1]}.get(family, [])

    # 1. sampled rollouts, EOS, three chunks of 2 rows (G=2), forced prefixes
    ref_e, new_e = _engines(policy, stop=StopChecker(EOS), params=SamplingParams(max_new_tokens=MAX_NEW),
                            banned=structural)
    ks = [0, 3, 6]
    seen = {"ref": [], "new": []}  # image inputs the vision tower encoded, per path
    key = ["ref"]
    hook = (policy.vision_model.register_forward_pre_hook(lambda _m, args: seen[key[0]].append(args[0].shape[0]))
            if policy.vision_model is not None else None)
    ref_rows = _rows(ref_e.generate(prompts, ks, group_size=2, step=1))
    key[0] = "new"
    out["eos"] = (ref_rows, _rows(new_e.generate(prompts, ks, group_size=2, step=1)))
    if hook is not None:
        hook.remove()
    out["vision_inputs"] = {k: sum(v) for k, v in seen.items()}
    # the same, sampling from each TP rank's logits shard (Gumbel-max, no [B, V] gather)
    _, vp_e = _engines(policy, stop=StopChecker(EOS), params=SamplingParams(max_new_tokens=MAX_NEW),
                       banned=structural, vocab_parallel=True)
    out["eos_vocab_parallel"] = _rows(vp_e.generate(prompts, ks, group_size=2, step=1))
    out["references"] = [p.reference_ids for p in prompts]
    out["ks"] = ks

    # 2. stop strings checked every 3 tokens on the host, temperature and top-p, many banned tokens
    stop = StopChecker((), stop_strings=["q"], decode=_decode_text)
    banned = list(range(150, VOCAB))
    params = SamplingParams(temperature=0.7, top_p=0.8, max_new_tokens=MAX_NEW)
    ref_e, new_e = _engines(policy, stop=stop, params=params, banned=banned, max_rows=6)
    new_rows = _rows(new_e.generate(prompts, [0, 1, 2], group_size=2, step=2))
    out["stop"] = (_rows(ref_e.generate(prompts, [0, 1, 2], group_size=2, step=2)), new_rows)
    # top-p / banned honoured against the teacher-forced distribution
    violations = 0
    for pid, prefix, gen_tokens, _lp, _f in new_rows:
        p = prompts[pid]
        full = _full_logits(policy, PromptInput(key=0, prompt_ids=p.prompt_ids + prefix, pixel_values=p.pixel_values,
                                                image_grid_thw=p.image_grid_thw), gen_tokens)
        full[:, banned] = float("-inf")
        allowed = torch.isfinite(top_p_filter(torch.log_softmax(full / 0.7, -1), 0.8))
        violations += int((~allowed[torch.arange(len(gen_tokens)), torch.tensor(gen_tokens)]).sum())
    out["nucleus_violations"] = violations
    out["banned"] = banned

    # 3. teacher-forced recompute of the rollout log-probs (T=1; text LMs ban nothing: the training quantity;
    #    the VLMs ban their structural tokens in both)
    _, new_e = _engines(policy, stop=StopChecker(), params=SamplingParams(max_new_tokens=MAX_NEW), max_rows=6,
                        banned=structural)
    worst = 0.0
    for pid, prefix, gen_tokens, lps, _f in _rows(new_e.generate(prompts, [2, 0, 4], group_size=2, step=3)):
        p = prompts[pid]
        full = _full_logits(policy, PromptInput(key=0, prompt_ids=p.prompt_ids + prefix, pixel_values=p.pixel_values,
                                                image_grid_thw=p.image_grid_thw), gen_tokens)
        full[:, structural] = float("-inf")
        tf = torch.log_softmax(full, -1)[torch.arange(len(gen_tokens)), torch.tensor(gen_tokens)]
        worst = max(worst, (tf - torch.tensor(lps)).abs().max().item())
    out["teacher_forced_err"] = worst

    # 4. greedy == greedy_generate (left padding, images)
    from megatron_rcpa.rollout.batch import left_pad

    seqs = [p.prompt_ids for p in prompts]
    ids, mask = left_pad(seqs, 0)
    kw = {}
    if prompts[0].pixel_values is not None:
        kw["pixel_values"] = torch.cat([p.pixel_values for p in prompts])
    if prompts[0].image_grid_thw is not None:
        kw["image_grid_thw"] = torch.cat([p.image_grid_thw for p in prompts])
    ref = greedy_generate(policy, ids, max_new_tokens=MAX_NEW, attention_mask=mask, **kw)
    got = static_generate(policy, ids, mask, max_new_tokens=MAX_NEW, pad_id=0, vocab_size=policy.vocab_size,
                          greedy=True, tp_group=tp_group, **kw)
    got_vp = static_generate(policy, ids, mask, max_new_tokens=MAX_NEW, pad_id=0, vocab_size=policy.vocab_size,
                             greedy=True, tp_group=tp_group, vocab_parallel_sampling=True, **kw)
    out["greedy"] = (ref.tolist(), [g for g, _lp, _f in got], [g for g, _lp, _f in got_vp])
    return out


def tp1_worker(families):
    return {f: family_checks(f) for f in families}


def tp2_worker(families):
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    return {"rank": ps.get_tensor_model_parallel_rank(), **{f: family_checks(f, group) for f in families}}


def mrope_worker():
    """MRoPE of generated text tokens == one position per row, and == the decode path's 1-D table."""
    from megatron_rcpa.models.inference import KVCache
    from megatron_rcpa.models.mrope import next_positions
    from megatron_rcpa.rollout.static_decode import decoder_for

    policy = _build("qwen2_5_vl")
    prompts = _prompts("qwen2_5_vl", policy)
    from megatron_rcpa.rollout.batch import left_pad

    seqs = [p.prompt_ids for p in prompts]
    ids, mask = left_pad(seqs, 0)
    width = ids.shape[1]
    grid = torch.cat([p.image_grid_thw for p in prompts])
    pv = torch.cat([p.pixel_values for p in prompts])
    # the reference path's positions: prefill, then 4 decode steps through the policy's own cache bookkeeping
    cache = KVCache(len(seqs), width + 4)
    with torch.no_grad():
        policy(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid, kv_cache=cache)
        prompt_pos = cache.position_ids.clone()
        for _ in range(4):
            policy(input_ids=torch.full((len(seqs), 1), 5), kv_cache=cache)
    gen_pos = cache.position_ids[:, :, width:]  # [3, B, 4]
    lm = policy.language_model
    emb = lm.rotary_pos_emb(gen_pos, mrope_section=lm.config.mrope_section).transpose(0, 1)  # [B, 4, 1, d]
    cos, sin = decoder_for(policy).rope_table(width + 8, ids.device, torch.float32)
    start = next_positions(prompt_pos, mask)
    one_d = start[:, None] + torch.arange(4)[None]
    image_tokens = (ids == policy.image_token_id).sum(1)
    return {
        "streams_equal": bool((gen_pos == gen_pos[0:1]).all()),
        "one_position_per_row": torch.equal(gen_pos[0], one_d),
        "start_is_max_plus_one": torch.equal(start, prompt_pos.masked_fill(~mask.bool()[None], -1).amax((0, 2)) + 1),
        "compressed": bool((start < mask.sum(1)).all()) and bool((image_tokens > 0).all()),
        "cos_equal": torch.equal(torch.cos(emb)[:, :, 0], cos[one_d]),
        "sin_equal": torch.equal(torch.sin(emb)[:, :, 0], sin[one_d]),
    }


FAMILIES = ("llama", "qwen2", "qwen2_5_vl", "llava")


@pytest.fixture(scope="module")
def tp1():
    from megatron_rcpa.testing.launcher import run_distributed

    return run_distributed(tp1_worker, world_size=1, args=(FAMILIES,), timeout=TIMEOUT)[0]


def _same_rollouts(ref, new, tol=1e-5):
    assert len(ref) == len(new)
    for a, b in zip(ref, new):
        assert a[0] == b[0] and a[1] == b[1]  # prompt, forced prefix
        assert a[2] == b[2], (a, b)  # generated tokens
        assert a[4] == b[4]  # finished
        assert len(a[3]) == len(b[3]) and max([abs(x - y) for x, y in zip(a[3], b[3])] or [0.0]) <= tol


@pytest.mark.multiproc
@pytest.mark.parametrize("family", FAMILIES)
def test_static_decode_matches_the_reference_loop(tp1, family):
    res = tp1[family]
    ref, new = res["eos"]
    _same_rollouts(ref, new)
    assert any(r[4] for r in new) and any(len(r[2]) < MAX_NEW for r in new)  # EOS ended some rows early
    for pid, prefix, *_ in new:  # forced prefixes verbatim
        assert prefix == res["references"][pid][: res["ks"][pid]]
    if family in ("qwen2_5_vl", "llava"):  # each prompt's images encoded once, not once per rollout (G=2)
        assert res["vision_inputs"]["ref"] == 2 * res["vision_inputs"]["new"] > 0
    ref, new = res["stop"]
    _same_rollouts(ref, new)
    assert any(r[4] and "q" in _decode_text(r[2]) for r in new)  # stop strings ended rows
    assert all(t not in res["banned"] for r in new for t in r[2])
    assert res["nucleus_violations"] == 0
    assert res["teacher_forced_err"] <= 1e-5
    ref_greedy, new_greedy, vp_greedy = res["greedy"]
    assert new_greedy == ref_greedy == vp_greedy
    _same_rollouts(res["eos"][0], res["eos_vocab_parallel"])


@pytest.mark.multiproc
def test_tp2_ranks_agree_and_match_the_reference():
    from megatron_rcpa.testing.launcher import run_distributed

    families = ("llama", "qwen2_5_vl", "llava")  # (the tiny qwen2 has one KV head: TP=2 cannot split it)
    ranks = run_distributed(tp2_worker, world_size=2, tp=2, args=(families,), timeout=TIMEOUT)
    for family in families:
        a, b = ranks[0][family], ranks[1][family]
        for key in ("eos", "stop"):
            _same_rollouts(*a[key])
            assert [r[2] for r in a[key][1]] == [r[2] for r in b[key][1]]  # identical tokens on both TP ranks
        # vocab-parallel sampling (each rank its own shard): the reference's tokens, on both ranks
        _same_rollouts(a["eos"][0], a["eos_vocab_parallel"])
        assert [r[2] for r in a["eos_vocab_parallel"]] == [r[2] for r in b["eos_vocab_parallel"]]
        assert a["greedy"][1] == a["greedy"][0] == b["greedy"][1] == a["greedy"][2] == b["greedy"][2]
        assert a["teacher_forced_err"] <= 1e-5 and a["nucleus_violations"] == 0


@pytest.mark.multiproc
def test_mrope_decode_positions_reduce_to_one_position_per_row():
    from megatron_rcpa.testing.launcher import run_distributed

    res = run_distributed(mrope_worker, world_size=1, timeout=TIMEOUT)[0]
    assert all(res.values()), res


def test_bench_rollout_quick_runs_and_writes_json(tmp_path):
    """bench/bench_rollout.py --quick (tiny fp32 model on a CPU): both paths timed, same greedy first tokens; the
    ragged case with compaction off and on."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, os.path.join(root, "bench", "bench_rollout.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (name,) = [n for n in os.listdir(tmp_path) if n.startswith("bench_rollout_")]
    with open(tmp_path / name) as f:
        data = json.load(f)
    rows = data["results"]
    assert {(r["batch"], r["prompt"]) for r in rows} == {(2, 6), (4, 6), (2, 12), (4, 12)}
    for r in rows:
        assert r["old_ms"] > 0 and r["new_ms"] > 0 and r["new_e2e_ms"] > 0 and r["tokens_equal"] is True
    # the ragged case: compaction decodes fewer rows for the same tokens
    (rag,) = data["ragged"]
    assert rag["batch"] == 8 and rag["tokens_equal"] is True and rag["compactions"]
    assert rag["row_steps_on"] < rag["row_steps_off"] == 8 * rag["decode_steps"]
