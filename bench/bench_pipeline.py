"""Pipeline bubble of the static decode path at PP > 1 (issue 12; megatron_rcpa/rollout/static_pipeline.py).

Runs ``pipeline_generate`` on ``--pp`` ranks (one pipeline stage each) for each ``--microbatches`` setting and
reports, per stage, the time spent computing (its layers; the first stage also embeds, the last also applies the
output layer and samples) against the wall time of the whole call: ``busy_fraction`` = busy / wall and
``bubble`` = 1 - busy_fraction. With 1 micro-batch a stage waits for the others (PP - 1) / PP of the time; with
PP micro-batches the stages overlap and only the fill / drain, the host checks and load imbalance remain.
Tokens are sampled with a fixed seed and no EOS (every row decodes ``--steps`` tokens); ``tokens_equal`` says
that every micro-batch setting produced the same tokens. ``reference`` is the wall time of the reference loop
(``RolloutEngine(decode="reference")``: megatron's schedule per token) on the same rows, for comparison.

On CUDA each compute section is bracketed by ``torch.cuda.synchronize`` (timing only), so the busy time is the
device's. PP ranks need one GPU each (NCCL refuses two ranks on one GPU): on a one-GPU machine run it on the CPU
with ``CUDA_VISIBLE_DEVICES=``.

JSON goes to ``$OUT/bench_pipeline_<device>.json`` (``$OUT`` defaults to ./bench/results/local).

    python bench/bench_pipeline.py --quick                 # tiny fp32 Qwen2.5-VL-style model on a CPU, PP = 2
    python bench/bench_pipeline.py --pp 2 --batch 64       # 2.2B architecture (bf16), needs 2 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _policy(quick: bool):
    """bench_rollout's policy (N(0, 0.02) weights filled on the device); the quick one a little wider and deeper
    than its default so that the stages have work to overlap."""
    from bench_rollout import build_policy

    return build_policy(quick, vocab_size=2048, hidden_size=256, num_layers=4, intermediate_size=768,
                        mrope_section=(8, 12, 12))


def worker(quick: bool, batch: int, prompt: int, steps: int, micro_settings, repeats: int, reference: bool):
    from megatron_rcpa.rollout.static_pipeline import pipeline_generate
    from megatron_rcpa.runtime.parallel import ParallelGroups

    groups = ParallelGroups.from_parallel_state()
    policy = _policy(quick)
    device = next(policy.parameters()).device
    vocab = policy.vocab_size
    ids = torch.randint(10, min(vocab - 10, 150000), (batch, prompt), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    out = {"stage": groups.pp_rank, "runs": {}}
    for micro in micro_settings:
        best, tokens = None, None
        for rep in range(repeats + 1):  # the first run warms up
            timing = {}
            gen = torch.Generator(device=device).manual_seed(7)
            rows = pipeline_generate(policy, ids, mask, groups=groups, max_new_tokens=steps, pad_id=0,
                                     vocab_size=vocab, generator=gen, banned_ids=range(vocab - 7, vocab),
                                     stop_check_every=8, microbatches=micro, timing=timing)
            tokens = [g for g, _lp, _f in rows]
            if rep and (best is None or timing["wall_s"] < best["wall_s"]):
                best = timing
        out["runs"][micro] = dict(best, tokens=tokens)
    if reference:
        out["reference_wall_s"] = _reference_wall(policy, groups, ids, steps, repeats)
    return out


def _reference_wall(policy, groups, ids, steps: int, repeats: int) -> float:
    """Best wall time of the reference loop (megatron's schedule per token) on the same rows and token count."""
    import time

    from megatron_rcpa.rollout.engine import PromptInput, RolloutEngine, SamplingParams
    from megatron_rcpa.rollout.sampling import StopChecker

    vocab = policy.vocab_size
    engine = RolloutEngine(policy, vocab_size=vocab, pad_id=0, stop=StopChecker(), groups=groups,
                           params=SamplingParams(max_new_tokens=steps), banned_token_ids=range(vocab - 7, vocab),
                           max_rows=ids.shape[0], decode="reference")
    prompts = [PromptInput(key=i, prompt_ids=row) for i, row in enumerate(ids.tolist())]
    best = None
    for rep in range(repeats + 1):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.generate(prompts, [0] * len(prompts), group_size=1, step=rep)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if rep:
            best = min(best or float("inf"), time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny fp32 model on a CPU")
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--batch", type=int, default=None, help="rows (default 16 quick, 64 full)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 32 quick, 70 full)")
    p.add_argument("--steps", type=int, default=None, help="new tokens per row (default 32 quick, 128 full)")
    p.add_argument("--microbatches", default=None, help="comma-separated settings (default: 1,PP)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per setting after a warm-up (best kept)")
    p.add_argument("--no-reference", action="store_true", help="skip timing the reference loop at the same PP")
    p.add_argument("--out", default=os.environ.get("OUT", os.path.join("bench", "results", "local")))
    args = p.parse_args(argv)
    if args.pp < 2:
        p.error(f"--pp {args.pp}: the pipeline path needs PP >= 2")
    if torch.cuda.is_available() and torch.cuda.device_count() < args.pp:
        print(f"bench_pipeline: --pp {args.pp} needs {args.pp} GPUs, this machine has {torch.cuda.device_count()}; "
              "run it on the CPU with CUDA_VISIBLE_DEVICES= (and --quick)", file=sys.stderr)
        return 2
    batch = args.batch or (16 if args.quick else 64)
    prompt = args.prompt or (32 if args.quick else 70)
    steps = args.steps or (32 if args.quick else 128)
    micro = [int(m) for m in args.microbatches.split(",")] if args.microbatches else [1, args.pp]
    from megatron_rcpa.testing.launcher import run_distributed

    ranks = run_distributed(worker, world_size=args.pp, pp=args.pp,
                            args=(args.quick, batch, prompt, steps, micro, args.repeats, not args.no_reference),
                            timeout=3600)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or 'unknown'})"
    results = []
    for m in micro:
        stages = [{"stage": r["stage"], "busy_s": r["runs"][m]["busy_s"], "wall_s": r["runs"][m]["wall_s"],
                   "busy_fraction": r["runs"][m]["busy_s"] / r["runs"][m]["wall_s"]} for r in ranks]
        for s in stages:
            s["bubble"] = 1.0 - s["busy_fraction"]
        wall = max(s["wall_s"] for s in stages)
        results.append({"microbatches": m, "wall_s": wall, "ms_per_token_step": wall / steps * 1e3,
                        "mean_bubble": sum(s["bubble"] for s in stages) / len(stages), "stages": stages})
    tokens_equal = all(r["runs"][m]["tokens"] == ranks[0]["runs"][micro[0]]["tokens"] for r in ranks for m in micro)
    print(f"{'micro':>6} {'wall s':>8} {'ms/step':>8} " + " ".join(f"{'busy' + str(i):>7} {'bubble' + str(i):>8}"
                                                                 for i in range(args.pp)))
    for r in results:
        print(f"{r['microbatches']:>6} {r['wall_s']:>8.3f} {r['ms_per_token_step']:>8.2f} "
              + " ".join(f"{s['busy_fraction']:>7.2f} {s['bubble']:>8.2f}" for s in r["stages"]))
    reference = None
    if not args.no_reference:
        wall = max(r["reference_wall_s"] for r in ranks)
        reference = {"wall_s": wall, "ms_per_token_step": wall / steps * 1e3}
        print(f"reference loop (megatron schedule per token): {wall:.3f} s, {wall / steps * 1e3:.2f} ms/step")
    print(f"tokens_equal={tokens_equal}")
    env = {"device": device, "torch": torch.__version__, "python": platform.python_version(), "quick": args.quick,
           "cpu_count": os.cpu_count(), "loadavg_1min": os.getloadavg()[0],
           "pp": args.pp, "batch": batch, "prompt": prompt, "steps": steps,
           "model": "tiny qwen2.5-vl fp32 (hidden 256, 4 layers)" if args.quick
           else "qwen2.5-vl 2.2B arch (1.5B decoder) bf16"}
    os.makedirs(args.out, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9]+", "_", device.split(" (")[0].replace("NVIDIA ", "")).strip("_")
    path = os.path.join(args.out, f"bench_pipeline_{name}.json")
    with open(path, "w") as f:
        json.dump({"env": env, "tokens_equal": tokens_equal, "results": results, "reference": reference}, f,
                  indent=1)
    print(json.dumps({"json": path}))
    return 0 if tokens_equal else 1


if __name__ == "__main__":
    sys.exit(main())
