"""Rollout decode benchmark (issue 12): ms per decode step of the reference loop (RolloutEngine's per-token
path on megatron's KV cache) and of the static-shape path (megatron_rcpa/rollout/static_decode.py, CUDA graph
on a GPU), next to the weight-read floor, for the 2.2B Qwen2.5-VL architecture of
``bench/make_arch_checkpoint.py`` (Qwen2.5-1.5B decoder + the Qwen2.5-VL vision tower; random bf16 weights).

Shapes: batch 64 / 128 / 256 rows x prompt 70 / 1024 tokens (text-only prompts: the decode step does not see
the images), ``--steps`` timed decode steps after ``--warmup`` (the same sampling work in both paths:
temperature 1, top-p 1, the Qwen2.5-VL special tokens banned). Per case:

* ``old_ms`` / ``new_ms``: median over the timed steps of one decode step (forward of one token per row +
  sampling + the path's bookkeeping: the old path's ``tolist()`` and per-row loop included);
* ``new_e2e_ms``: one whole ``static_generate`` call (prefill + ``steps`` tokens, host checks) / steps;
* ``floor_weights_ms``: the bytes of the decoder + output-layer weights / the measured device copy bandwidth
  (read + write of 1 GiB, as bench_logprob measures it); ``floor_kv_ms`` adds one read of the KV cache;
* ``prefill_old_ms`` / ``prefill_new_ms``; ``tokens_equal``: greedy tokens of the two paths for the first
  steps (bf16: a near tie may flip one; the CPU tests check exact equality in fp32);
* an out-of-memory case is recorded as ``"OOM"`` and the run goes on.

``ragged`` (compaction, issue 12 item 3): batch 64 / 256 of 70-token prompts with random left padding, sampled
until one of 2% of the vocabulary's ids (EOS: geometric lengths) or 128 tokens, one ``static_generate`` call
with compaction off and one with it on: ``decode_steps``, ``row_steps_off`` / ``row_steps_on`` (rows decoded
summed over the steps), ``row_steps_saved``, ``ms_off`` / ``ms_on`` (wall time of the call, prefill and host
checks included), ``tokens_equal`` (bf16 on a GPU: a near tie may flip one), ``compactions`` ((step, from, to)).
With ``--quick`` these are CPU numbers of a tiny model (``env.device`` says so).

JSON goes to ``$OUT/bench_rollout_<device>.json`` (``$OUT`` defaults to ./bench/results/local).

    python bench/bench_rollout.py                 # on a GPU: the full shapes
    python bench/bench_rollout.py --quick         # a tiny fp32 model on a CPU (what the test runs)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CUDA = torch.cuda.is_available()

FULL = dict(batches=(64, 128, 256), prompts=(70, 1024), steps=32, warmup=4)
QUICK = dict(batches=(2, 4), prompts=(6, 12), steps=4, warmup=1)
# the ragged case: rows of different prompt lengths ending at different steps (EOS = this share of the vocabulary)
RAGGED_FULL = dict(batches=(64, 256), prompt=70, max_new=128, eos_fraction=0.02)
RAGGED_QUICK = dict(batches=(8,), prompt=12, max_new=16, eos_fraction=0.1)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def copy_bandwidth():
    """Device copy bandwidth, bytes read + written per second (None on a CPU)."""
    if not CUDA:
        return None
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        b.copy_(a)
    end.record()
    sync()
    return 2 * n * 20 / (start.elapsed_time(end) * 1e-3)


def build_policy(quick: bool, **tiny_overrides):
    """The Qwen2.5-VL policy, built without megatron's (CPU) initialisation and filled on the device:
    N(0, 0.02) weights, unit norms, zero biases (random weights decode at the same speed). ``tiny_overrides``
    go to ``tiny_qwen2_5_vl_config`` (quick runs only)."""
    from megatron_rcpa.models.qwen2_5_vl import build_qwen2_5_vl_policy

    if quick:
        from megatron_rcpa.models.tiny import tiny_qwen2_5_vl_config

        cfg, dtype = tiny_qwen2_5_vl_config(**tiny_overrides), torch.float32
    else:
        from make_arch_checkpoint import PRESETS  # bench/ is on sys.path (this script's folder)
        from transformers import Qwen2_5_VLConfig

        spec = PRESETS["1.5b"]
        cfg = Qwen2_5_VLConfig(text_config=spec["text"], vision_config=spec["vision"], image_token_id=151655,
                               video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
                               tie_word_embeddings=spec["text"]["tie_word_embeddings"])
        dtype = torch.bfloat16
    policy = build_qwen2_5_vl_policy(cfg, params_dtype=dtype, perform_initialization=False)
    gen = torch.Generator(device=next(policy.parameters()).device).manual_seed(0)
    with torch.no_grad():
        for name, p in policy.language_model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return policy.eval()


def weight_bytes(policy) -> int:
    """Bytes one decode step must read: decoder layers, final norm, output layer (the embedding matrix when
    tied; the embedding lookup itself reads only B rows)."""
    lm = policy.language_model
    n = sum(p.numel() * p.element_size() for p in lm.decoder.parameters())
    out = lm.shared_embedding_or_output_weight() if lm.share_embeddings_and_output_weights else lm.output_layer.weight
    return n + out.numel() * out.element_size()


def kv_bytes(policy, batch: int, length: int) -> int:
    cfg = policy.language_model.config
    elem = next(policy.language_model.parameters()).element_size()
    return 2 * cfg.num_layers * batch * cfg.num_query_groups * cfg.kv_channels * length * elem


def prompts_for(policy, batch: int, prompt: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, min(policy.vocab_size - 10, 150000), (batch, prompt), generator=gen)
    return ids, torch.ones_like(ids)


def time_steps(step, n: int, warmup: int):
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def old_path(policy, ids, mask, banned, steps: int, warmup: int):
    """The reference loop's decode step: megatron KV-cache forward, sampling, tolist + per-row bookkeeping."""
    from megatron_rcpa.models.inference import KVCache
    from megatron_rcpa.rollout.engine import RolloutEngine, SamplingParams
    from megatron_rcpa.rollout.sampling import StopChecker

    device = next(policy.parameters()).device
    b, w = ids.shape
    engine = RolloutEngine(policy, vocab_size=policy.vocab_size, pad_id=0, stop=StopChecker([policy.vocab_size + 1]),
                           params=SamplingParams(max_new_tokens=steps + warmup + 1), banned_token_ids=banned)
    gen = torch.Generator(device=device).manual_seed(0)
    cache = KVCache(b, w + steps + warmup + 1)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = engine._forward(cache, input_ids=ids.to(device), attention_mask=mask.to(device))
    sync()
    prefill_ms = (time.perf_counter() - t0) * 1e3
    greedy = logits.argmax(-1).tolist()
    state = {"logits": logits}
    completions = [[] for _ in range(b)]

    def step():
        tok, lp = engine._sample(state["logits"], b, gen, device)
        tok_l, lps = tok.tolist(), lp.tolist()
        del lps  # transferred as the engine does; not needed here
        for r in range(b):
            completions[r].append(tok_l[r])
            engine.stop.is_done(completions[r])
        with torch.no_grad():
            state["logits"] = engine._forward(cache, input_ids=tok[:, None],
                                              attention_mask=torch.ones(b, 1, dtype=torch.long, device=device))

    return prefill_ms, time_steps(step, steps, warmup), greedy


def new_path(policy, ids, mask, banned, steps: int, warmup: int):
    """The static path's decode step (CUDA graph replay on a GPU, eager on a CPU)."""
    from megatron_rcpa.rollout.static_decode import LENGTH_BUCKET, _round_up, _Sampler, _State, decoder_for

    device = next(policy.parameters()).device
    dtype = next(policy.language_model.parameters()).dtype
    b, w = ids.shape
    dec = decoder_for(policy)
    max_new = steps + warmup + 1
    length = _round_up(w + max_new, LENGTH_BUCKET)
    gen = torch.Generator(device=device).manual_seed(0)
    sampler = _Sampler(batch=b, vocab_size=policy.vocab_size, temperature=1.0, top_p=1.0, greedy=False,
                       banned_ids=banned, eos_ids=(), pad_id=0, generator=gen, device=device)
    if CUDA:
        graph = dec.graph_for(b, length, max_new, device, dtype, sampler)
        state, sampler = graph.state, graph.sampler

        def step():
            graph.replay(b)
    else:
        state = _State(dec, b, length, max_new, device, dtype)

        def step():
            dec.step(state, sampler)
    state.reset()
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = dec.prefill(state, ids.to(device), mask.to(device), None, None, policy.vocab_size)
    sync()
    prefill_ms = (time.perf_counter() - t0) * 1e3
    greedy = logits.argmax(-1).tolist()
    sampler.sample_and_record(state, logits)
    with torch.no_grad():
        ms = time_steps(step, steps, warmup)
    return prefill_ms, ms, greedy


def new_e2e(policy, ids, mask, banned, steps: int):
    from megatron_rcpa.rollout.static_decode import static_generate

    device = next(policy.parameters()).device
    gen = torch.Generator(device=device).manual_seed(0)
    run = lambda: static_generate(policy, ids, mask, max_new_tokens=steps, banned_ids=banned, pad_id=0,  # noqa: E731
                                  vocab_size=policy.vocab_size, generator=gen)
    run()  # capture / warm-up
    sync()
    t0 = time.perf_counter()
    run()
    sync()
    return (time.perf_counter() - t0) * 1e3 / steps


def ragged(policy, banned, batch: int, prompt: int, max_new: int, eos_fraction: float):
    """Compaction on vs off, one ``static_generate`` call each (after a warm-up / capture call): rows of
    different prompt lengths (left padding), sampled at temperature 1 until an EOS id (``eos_fraction`` of the
    vocabulary: geometric lengths) or ``max_new``. Reports the decode steps, the rows decoded summed over them
    (``row_steps``: what compaction cuts), the wall time of each call and whether the tokens agree."""
    from megatron_rcpa.rollout.static_decode import static_generate

    device = next(policy.parameters()).device
    ids, mask = prompts_for(policy, batch, prompt, seed=2)
    pads = torch.randint(0, prompt // 2, (batch,), generator=torch.Generator().manual_seed(3))
    for r, k in enumerate(pads.tolist()):
        ids[r, :k], mask[r, :k] = 0, 0
    n_eos = max(1, int(eos_fraction * policy.vocab_size))
    eos = [t for t in range(10, policy.vocab_size) if t not in set(banned)][:n_eos]
    row = {"case": "ragged", "batch": batch, "prompt": prompt, "max_new": max_new, "eos_ids": len(eos)}
    tokens = {}
    for compact in (False, True):
        name = "on" if compact else "off"

        def run(stats=None, compact=compact):
            gen = torch.Generator(device=device).manual_seed(0)
            return static_generate(policy, ids, mask, max_new_tokens=max_new, banned_ids=banned, eos_ids=eos,
                                   pad_id=0, vocab_size=policy.vocab_size, generator=gen, compact=compact,
                                   stats=stats)

        try:
            run()  # capture / warm-up
            stats = {}
            sync()
            t0 = time.perf_counter()
            out = run(stats)
            sync()
        except torch.OutOfMemoryError:
            row[f"ms_{name}"] = "OOM"
            continue
        row[f"ms_{name}"] = (time.perf_counter() - t0) * 1e3
        row[f"row_steps_{name}"] = stats["row_steps"]
        row["decode_steps"] = stats["decode_steps"]
        if compact:
            row["compactions"] = stats["compactions"]
        tokens[name] = [g for g, _lp, _f in out]
        row["mean_length"] = sum(len(g) for g in tokens[name]) / batch
        if CUDA:
            torch.cuda.empty_cache()
    if len(tokens) == 2:
        row["tokens_equal"] = tokens["on"] == tokens["off"]
        row["row_steps_saved"] = 1 - row["row_steps_on"] / row["row_steps_off"]
        row["speedup"] = row["ms_off"] / row["ms_on"]
    return row


def graph_checks(policy, banned):
    """The captured decode step against the same step run eagerly: greedy and fixed-seed sampled tokens
    (identical kernels and generator draws, so they must match exactly), and the caller's generator state
    handed back; ``sampled_compacted``: rows ending at different steps, eager without / with compaction and the
    graphs with compaction (captured, then cached): same tokens and generator state, and it did compact
    (``compacted``). CUDA only."""
    from megatron_rcpa.rollout.static_decode import static_generate

    device = next(policy.parameters()).device
    ids, mask = prompts_for(policy, 4, 70, seed=1)
    out = {}
    for greedy in (True, False):
        runs = []
        for graph in (False, True, True):  # eager, capture + replay, replay of the cached graph
            gen = torch.Generator(device=device).manual_seed(3)
            rows = static_generate(policy, ids, mask, max_new_tokens=12, banned_ids=banned, pad_id=0,
                                   vocab_size=policy.vocab_size, generator=gen, greedy=greedy, use_cuda_graph=graph)
            runs.append(([g for g, _lp, _f in rows], gen.get_state().tolist()))
        out["greedy" if greedy else "sampled"] = {"tokens_equal": runs[0][0] == runs[1][0] == runs[2][0],
                                                  "generator_state_equal": runs[0][1] == runs[1][1] == runs[2][1]}
    # rows ending at different steps (EOS = 5% of the vocabulary): compaction through the bucket graphs
    ids, mask = prompts_for(policy, 8, 70, seed=4)
    eos = [t for t in range(10, policy.vocab_size) if t not in set(banned)][: policy.vocab_size // 20]
    runs = []
    for graph, compact in ((False, False), (False, True), (True, True), (True, True)):
        gen = torch.Generator(device=device).manual_seed(5)
        stats = {}
        rows = static_generate(policy, ids, mask, max_new_tokens=40, banned_ids=banned, eos_ids=eos, pad_id=0,
                               vocab_size=policy.vocab_size, generator=gen, use_cuda_graph=graph, compact=compact,
                               stats=stats)
        runs.append(([g for g, _lp, _f in rows], gen.get_state().tolist(), stats["compactions"]))
    out["sampled_compacted"] = {"tokens_equal": all(r[0] == runs[0][0] for r in runs),
                                "generator_state_equal": all(r[1] == runs[0][1] for r in runs),
                                "compacted": bool(runs[2][2])}  # booleans only: gpu_session.sh checks each
    return out


def bench(args):
    cfg = QUICK if args.quick else FULL
    steps, warmup = args.steps or cfg["steps"], cfg["warmup"]
    policy = build_policy(args.quick)
    banned = list(range(policy.vocab_size - 7, policy.vocab_size)) if args.quick else list(range(151643, 151665))
    bw = copy_bandwidth()
    wbytes = weight_bytes(policy)
    results = []
    checks = graph_checks(policy, banned) if CUDA else None
    if checks is not None:
        print(json.dumps({"graph_checks": checks}), flush=True)
    for prompt in cfg["prompts"]:
        for batch in cfg["batches"]:
            row = {"batch": batch, "prompt": prompt, "steps": steps, "weight_bytes": wbytes}
            length = prompt + steps + warmup + 1
            row["kv_bytes"] = kv_bytes(policy, batch, length)
            if bw:
                row["floor_weights_ms"] = wbytes / bw * 1e3  # bytes read at the copy's traffic rate
                row["floor_kv_ms"] = (wbytes + row["kv_bytes"]) / bw * 1e3
            ids, mask = prompts_for(policy, batch, prompt)
            for name, fn in (("old", old_path), ("new", new_path)):
                try:
                    pre, ms, greedy = fn(policy, ids, mask, banned, steps, warmup)
                    row[f"prefill_{name}_ms"], row[f"{name}_ms"], row[f"greedy_{name}"] = pre, ms, greedy
                except torch.OutOfMemoryError:
                    row[f"{name}_ms"] = "OOM"
                if CUDA:
                    torch.cuda.empty_cache()
            try:
                row["new_e2e_ms"] = new_e2e(policy, ids, mask, banned, steps)
            except torch.OutOfMemoryError:
                row["new_e2e_ms"] = "OOM"
            if "greedy_old" in row and "greedy_new" in row:
                row["tokens_equal"] = row.pop("greedy_old") == row.pop("greedy_new")
            if isinstance(row.get("old_ms"), float) and isinstance(row.get("new_ms"), float):
                row["speedup"] = row["old_ms"] / row["new_ms"]
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.startswith("greedy")}), flush=True)
            if CUDA:
                torch.cuda.empty_cache()
    rag = RAGGED_QUICK if args.quick else RAGGED_FULL
    ragged_rows = []
    for batch in rag["batches"]:
        row = ragged(policy, banned, batch, rag["prompt"], rag["max_new"], rag["eos_fraction"])
        ragged_rows.append(row)
        print(json.dumps(row), flush=True)
    return {"copy_bandwidth_Bps": bw, "graph_checks": checks, "results": results, "ragged": ragged_rows}


def _fmt(v):
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny fp32 model, small shapes (runs on a CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps per case")
    p.add_argument("--out", default=os.environ.get("OUT", os.path.join("bench", "results", "local")),
                   help="output folder of the JSON (default: $OUT or ./bench/results/local)")
    args = p.parse_args(argv)
    from megatron_rcpa.convert.runtime import run_on_layout

    env = {
        "device": torch.cuda.get_device_name() if CUDA else f"cpu ({platform.processor() or 'unknown'})",
        "torch": torch.__version__, "python": platform.python_version(), "quick": args.quick,
        "model": "tiny qwen2.5-vl fp32" if args.quick else "qwen2.5-vl 2.2B arch (1.5B decoder) bf16",
    }
    out = run_on_layout(bench, tp=1, pp=1, args=(args,), in_process=True)[0]
    print(f"{'batch':>6} {'prompt':>6} {'old ms':>9} {'new ms':>9} {'e2e ms':>9} {'floor':>7} {'floor+kv':>8} "
          f"{'speedup':>8} {'equal':>6}")
    for r in out["results"]:
        print(f"{r['batch']:>6} {r['prompt']:>6} {_fmt(r.get('old_ms')):>9} {_fmt(r.get('new_ms')):>9} "
              f"{_fmt(r.get('new_e2e_ms')):>9} {_fmt(r.get('floor_weights_ms', '-')):>7} "
              f"{_fmt(r.get('floor_kv_ms', '-')):>8} {_fmt(r.get('speedup', '-')):>8} {str(r.get('tokens_equal')):>6}")
    where = "GPU" if CUDA else "CPU (not a GPU number)"
    print(f"ragged rows, compaction off vs on, on {where}:")
    print(f"{'batch':>6} {'steps':>6} {'rows x steps off':>17} {'on':>8} {'saved':>6} {'ms off':>9} {'ms on':>9} "
          f"{'equal':>6}")
    for r in out["ragged"]:
        print(f"{r['batch']:>6} {r.get('decode_steps', '-'):>6} {r.get('row_steps_off', '-'):>17} "
              f"{r.get('row_steps_on', '-'):>8} {_fmt(r.get('row_steps_saved', '-')):>6} {_fmt(r.get('ms_off')):>9} "
              f"{_fmt(r.get('ms_on')):>9} {str(r.get('tokens_equal')):>6}")
    os.makedirs(args.out, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9]+", "_", env["device"].split(" (")[0].replace("NVIDIA ", "")).strip("_")
    path = os.path.join(args.out, f"bench_rollout_{name}.json")
    with open(path, "w") as f:
        json.dump({"env": env, **out}, f, indent=1)
    print(json.dumps({"json": path}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
