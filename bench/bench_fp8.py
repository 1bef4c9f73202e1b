"""FP8 through torchao (issue 17, item 4): GEMM-only ratio, train-step ratio and a loss-curve check, one JSON.

(a) **GEMM-only**, per shape (tokens x in -> out, hidden 4096 / 8192 models): the BF16 matmul against
    ``torch._scaled_mm`` on operands already in float8 (what the tensor cores do; tensorwise and rowwise scales),
    and the whole FP8 linear as training runs it (:func:`megatron_rcpa.models.fp8.fp8_linear`: dynamic scaling
    casts + the three GEMMs of forward and backward) against BF16 ``F.linear`` forward + backward. Medians over
    CUDA-event-timed repetitions; TFLOP/s; relative error of each output against an fp64 matmul.
(b) **Loss curve**: a small Llama-style text LM (our megatron policy, local spec; ``--hidden``/``--layers``) trained
    ``--steps`` steps from the same initial weights on the same batches (a fixed random sparse bigram language:
    the loss falls from log V towards the chain's entropy) in BF16 and with the decoder's linears in FP8
    (torchao tensorwise and rowwise); AdamW on fp32 master weights. Reports both curves, the max relative
    difference of FP8 to BF16 over the steps, and ms per step.
(c) **Train step** at hidden 4096 (4 layers, FFN 14336, 32 heads / 8 KV groups) and 8192 (2 layers, FFN 28672,
    64 / 8): forward + backward of our megatron policy (local spec, SDPA attention, vocab 32000) on micro-batch 4 x
    2048 tokens, BF16 vs FP8 (torchao tensorwise, rowwise); ms per step and model TFLOP/s (the profiler's FLOP
    model, ``megatron_rcpa/profiling/flops.py``, causal attention convention). Few layers keep the weights, grads
    and activations on one GPU; the per-layer ratio is what the shape decides.

    python bench/bench_fp8.py                   # on a GPU of compute capability 8.9+ (H100/H200)
    python bench/bench_fp8.py --quick           # CPU: (b) and (c) tiny, on torchao's emulation (the wiring; a test)

JSON: ``$OUT/bench_fp8_<card>.json`` (``--out``; ``$OUT`` defaults to ./bench/results/local).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CUDA = torch.cuda.is_available()
# tokens x in_features -> out_features: the projections of hidden-4096 (Llama-3-8B-like: FFN 14336) and
# hidden-8192 (FFN 28672) models at 8192 tokens per micro-batch
GEMM_SHAPES = ((8192, 4096, 4096), (8192, 4096, 6144), (8192, 4096, 28672), (8192, 14336, 4096),
               (8192, 8192, 8192), (8192, 8192, 10240), (8192, 8192, 57344), (8192, 28672, 8192))
LOSS_REL_TOL = 0.05  # FP8 vs BF16 loss, relative, every step


def card_name() -> str:
    if not CUDA:
        return "cpu"
    name = torch.cuda.get_device_name()
    name = name[len("NVIDIA "):] if name.startswith("NVIDIA ") else name
    return re.sub(r"[^A-Za-z0-9]+", "_", re.sub(r" \(.*", "", name)).strip("_")


def time_ms(fn, warmup: int = 10, reps: int = 50) -> float:
    """Median ms of ``fn()`` (CUDA events per repetition; wall clock on a CPU)."""
    for _ in range(warmup):
        fn()
    if not CUDA:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------- (a) GEMMs
def _quantise(t: torch.Tensor, dim):
    """(float8 e4m3 data, fp32 dequantisation scale) per tensor (dim None) or per slice along ``dim``."""
    fmax = torch.finfo(torch.float8_e4m3fn).max
    amax = (t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)).float().clamp(min=1e-12)
    scale = fmax / amax
    return (t.float() * scale).clamp(-fmax, fmax).to(torch.float8_e4m3fn), scale.reciprocal()


def gemm_case(m: int, k: int, n: int, reps: int) -> dict:
    import torch.nn.functional as F

    from megatron_rcpa.models.fp8 import fp8_linear

    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) / k ** 0.5
    ref = a.double() @ w.double().T
    row = {"m": m, "k": k, "n": n, "gemm_flops": 2 * m * k * n}

    def rel(out):
        return float((out.double() - ref).norm() / ref.norm())

    # GEMM only: operands already in float8 (the cast is not timed)
    a8, sa = _quantise(a, None)
    w8, sw = _quantise(w, None)
    a8r, sar = _quantise(a, 1)
    w8r, swr = _quantise(w, 1)
    gemms = {
        "bf16": lambda: a @ w.T,
        "fp8_tensorwise": lambda: torch._scaled_mm(a8, w8.T, scale_a=sa, scale_b=sw, out_dtype=torch.bfloat16,
                                                   use_fast_accum=True),
        "fp8_rowwise": lambda: torch._scaled_mm(a8r, w8r.T, scale_a=sar, scale_b=swr.T, out_dtype=torch.bfloat16,
                                                use_fast_accum=True),
    }
    for name, fn in gemms.items():
        try:
            ms = time_ms(fn, reps=reps)
            row[f"gemm_{name}_ms"] = ms
            row[f"gemm_{name}_tflops"] = row["gemm_flops"] / ms / 1e9
            row[f"gemm_{name}_rel_err"] = rel(fn())
        except RuntimeError as exc:  # e.g. rowwise scaling unsupported by this torch / card
            row[f"gemm_{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    for name in ("fp8_tensorwise", "fp8_rowwise"):
        if f"gemm_{name}_ms" in row:
            row[f"gemm_speedup_{name}"] = row["gemm_bf16_ms"] / row[f"gemm_{name}_ms"]

    # the training linear: forward + backward (3 GEMMs), FP8 including torchao's dynamic casts
    x = a.clone().requires_grad_()
    wp = torch.nn.Parameter(w.clone())
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=gen)

    def step(fn):
        def run():
            x.grad = None
            wp.grad = None
            fn(x, wp).backward(g)
        return run

    linears = {"bf16": lambda x, w: F.linear(x, w),
               "fp8_tensorwise": lambda x, w: fp8_linear(x, w, None, "tensorwise"),
               "fp8_rowwise": lambda x, w: fp8_linear(x, w, None, "rowwise")}
    for name, fn in linears.items():
        try:
            ms = time_ms(step(fn), reps=reps)
            row[f"linear_{name}_ms"] = ms
            row[f"linear_{name}_tflops"] = 3 * row["gemm_flops"] / ms / 1e9
            with torch.no_grad():
                row[f"linear_{name}_rel_err"] = rel(fn(a, w))
        except RuntimeError as exc:
            row[f"linear_{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    for name in ("fp8_tensorwise", "fp8_rowwise"):
        if f"linear_{name}_ms" in row:
            row[f"linear_speedup_{name}"] = row["linear_bf16_ms"] / row[f"linear_{name}_ms"]
    return row


# ----------------------------------------------------------------------------------------------- (b) loss
def bigram_batches(vocab: int, batch: int, seq: int, steps: int, seed: int):
    """``steps`` batches [batch, seq + 1] from a fixed random sparse bigram chain (4 successors per token)."""
    gen = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 4), generator=gen)
    probs = torch.tensor([0.55, 0.25, 0.15, 0.05])
    out = []
    for _ in range(steps):
        tok = torch.empty(batch, seq + 1, dtype=torch.long)
        tok[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
        choice = torch.multinomial(probs, batch * seq, replacement=True, generator=gen).view(batch, seq)
        for t in range(seq):
            tok[:, t + 1] = succ[tok[:, t], choice[:, t]]
        out.append(tok)
    return out


def train_curve(policy, batches, lr: float, device) -> dict:
    master = [p.detach().float().clone().requires_grad_(False) for p in policy.parameters()]
    opt = torch.optim.AdamW(master, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses, times = [], []
    for tok in batches:
        tok = tok.to(device)
        if CUDA:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for p in policy.parameters():
            p.grad = None
        loss = policy(input_ids=tok[:, :-1], labels=tok[:, 1:]).float().mean()
        loss.backward()
        for m, p in zip(master, policy.parameters()):
            m.grad = p.grad.float()
        opt.step()
        with torch.no_grad():
            for m, p in zip(master, policy.parameters()):
                p.copy_(m)
        if CUDA:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return {"loss": losses, "ms_per_step_median": 1e3 * statistics.median(times[len(times) // 5:])}


def loss_curves(hidden: int, layers: int, batch: int, seq: int, steps: int, lr: float, emulate: bool) -> dict:
    from megatron_rcpa.models import families
    from megatron_rcpa.models.attention import policy_attention_kwargs
    from megatron_rcpa.models.fp8 import emulate_fp8_for_tests, enable_torchao_fp8
    from megatron_rcpa.models.tiny import tiny_text_lm_config
    from megatron_rcpa.runtime.parallel import init_distributed, teardown

    vocab = 1000
    heads = max(4, hidden // 128)
    hf = tiny_text_lm_config("llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                             num_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                             max_position_embeddings=max(seq, 256))
    fam = families.get("llama")
    init_distributed(1, 1, seed=1234)
    try:
        device = torch.device("cuda") if CUDA else torch.device("cpu")
        torch.manual_seed(1234)
        attention = policy_attention_kwargs("llama", "sdpa")  # the trainer's default core attention
        base = fam.build_policy(hf.to_dict(), params_dtype=torch.bfloat16, **attention)
        state = {k: v.clone() if torch.is_tensor(v) else v for k, v in base.state_dict().items()}
        batches = bigram_batches(vocab, batch, seq, steps, seed=5)
        out = {"model": {"family": "llama", "hidden": hidden, "layers": layers, "heads": heads, "vocab": vocab,
                         "parameters": sum(p.numel() for p in base.parameters())},
               "batch": batch, "seq": seq, "steps": steps, "lr": lr, "emulated": emulate, "curves": {}}
        out["curves"]["bf16"] = train_curve(base, batches, lr, device)
        del base
        for recipe in ("tensorwise", "rowwise"):
            policy = fam.build_policy(hf.to_dict(), params_dtype=torch.bfloat16, perform_initialization=False,
                                      **attention)
            policy.load_state_dict(state)
            with emulate_fp8_for_tests() if emulate else contextlib.nullcontext():
                converted = enable_torchao_fp8(policy, recipe)
                curve = train_curve(policy, batches, lr, device)
            curve["fp8_linears"] = len(converted)
            out["curves"][f"fp8_{recipe}"] = curve
            del policy
        ref = out["curves"]["bf16"]["loss"]
        out["max_rel_diff"], out["final_rel_diff"] = {}, {}
        for name, curve in out["curves"].items():
            if name == "bf16":
                continue
            diffs = [abs(a - b) / abs(b) for a, b in zip(curve["loss"], ref)]
            out["max_rel_diff"][name] = max(diffs)
            out["final_rel_diff"][name] = diffs[-1]
            curve["speedup_vs_bf16"] = out["curves"]["bf16"]["ms_per_step_median"] / curve["ms_per_step_median"]
        out["tolerance"] = LOSS_REL_TOL
        out["within_tolerance"] = all(v <= LOSS_REL_TOL for v in out["max_rel_diff"].values())
        out["loss_fell"] = ref[-1] < 0.8 * ref[0]
        return out
    finally:
        teardown()


TRAIN_SHAPES = ((4096, 4, 14336, 32, 8), (8192, 2, 28672, 64, 8))  # hidden, layers, FFN, heads, KV groups


def train_step_case(hidden: int, layers: int, ffn: int, heads: int, groups: int, batch: int, seq: int,
                    reps: int, vocab: int = 32000) -> dict:
    from megatron_rcpa.models import families
    from megatron_rcpa.models.attention import policy_attention_kwargs
    from megatron_rcpa.models.fp8 import enable_torchao_fp8
    from megatron_rcpa.models.tiny import tiny_text_lm_config
    from megatron_rcpa.profiling.flops import DecoderShape, train_flops

    hf = tiny_text_lm_config("llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=groups, max_position_embeddings=seq)
    fam = families.get("llama")
    row = {"hidden": hidden, "layers": layers, "ffn": ffn, "heads": heads, "kv_groups": groups, "batch": batch,
           "seq": seq, "vocab": vocab}
    gen = torch.Generator().manual_seed(0)
    tok = torch.randint(0, vocab, (batch, seq + 1), generator=gen).to("cuda" if CUDA else "cpu")
    state = None  # megatron's (CPU) initialisation once; the other builds load its weights
    for name in ("bf16", "fp8_tensorwise", "fp8_rowwise"):
        policy = fam.build_policy(hf.to_dict(), params_dtype=torch.bfloat16, perform_initialization=state is None,
                                  **policy_attention_kwargs("llama", "sdpa"))
        if state is None:
            state = {k: v.clone() if torch.is_tensor(v) else v for k, v in policy.state_dict().items()}
        else:
            policy.load_state_dict(state)
        if name != "bf16":
            row[f"{name}_linears"] = len(enable_torchao_fp8(policy, name.split("_", 1)[1]))
        flops = train_flops(DecoderShape.from_hf_config(hf.to_dict(), vocab_size=policy.padded_vocab_size),
                            [seq] * batch, attention="causal")

        def step(policy=policy):
            for p in policy.parameters():
                p.grad = None
            policy(input_ids=tok[:, :-1], labels=tok[:, 1:]).float().mean().backward()

        try:
            ms = time_ms(step, warmup=3, reps=reps)
            row[f"{name}_ms"] = ms
            row[f"{name}_tflops"] = flops / ms / 1e9
        except RuntimeError as exc:  # e.g. out of memory
            row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        del policy
        if CUDA:
            torch.cuda.empty_cache()
    for name in ("fp8_tensorwise", "fp8_rowwise"):
        if f"{name}_ms" in row and "bf16_ms" in row:
            row[f"speedup_{name}"] = row["bf16_ms"] / row[f"{name}_ms"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU: torchao's emulation, tiny model, no GEMM timing")
    p.add_argument("--out", default=None, help="output folder (default $OUT or bench/results/local)")
    p.add_argument("--skip-gemm", action="store_true")
    p.add_argument("--skip-loss", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args(argv)
    if not CUDA and not args.quick:
        print("bench_fp8.py: no CUDA device (FP8 needs compute capability 8.9+); --quick runs the emulation on a "
              "CPU", file=sys.stderr)
        return 2
    if CUDA and torch.cuda.get_device_capability() < (8, 9):
        print(f"bench_fp8.py: {torch.cuda.get_device_name()} has no FP8 tensor cores (compute capability "
              f"{torch.cuda.get_device_capability()})", file=sys.stderr)
        return 2
    import torchao

    out_dir = args.out or os.environ.get("OUT") or os.path.join("bench", "results", "local")
    os.makedirs(out_dir, exist_ok=True)
    result = {"device": torch.cuda.get_device_name() if CUDA else platform.processor() or "cpu",
              "torch": torch.__version__, "torchao": torchao.__version__, "quick": args.quick,
              "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = os.path.join(out_dir, f"bench_fp8_{card_name()}.json")
    failed = []

    def save() -> None:  # after every section: a run cut short keeps what was measured
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    def section(name: str, fn) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - record it, run the other sections
            failed.append(name)
            result[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000],
                            "traceback": traceback.format_exc()[-4000:]}
            print(f"bench_fp8.py: section {name} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        save()

    def show(row) -> None:
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    def gemm() -> None:
        if not CUDA:
            result["gemm"] = "skipped: no CUDA device (no FP8 matmul on a CPU)"
            return
        result["gemm"] = []
        for m, k, n in GEMM_SHAPES:
            result["gemm"].append(gemm_case(m, k, n, args.reps))
            show(result["gemm"][-1])

    def loss() -> None:
        if args.quick:
            sizes = dict(hidden=args.hidden or 64, layers=args.layers or 2, batch=2, seq=32, steps=args.steps or 4,
                         lr=3e-3)
        else:
            sizes = dict(hidden=args.hidden or 1024, layers=args.layers or 8, batch=16, seq=512,
                         steps=args.steps or 50, lr=1e-3)
        result["loss_curve"] = lc = loss_curves(**sizes, emulate=not CUDA)
        show({"max_rel_diff": lc["max_rel_diff"], "final_rel_diff": lc["final_rel_diff"],
              "within_tolerance": lc["within_tolerance"], "loss_fell": lc["loss_fell"],
              "ms_per_step": {k: round(v["ms_per_step_median"], 2) for k, v in lc["curves"].items()}})

    def train() -> None:
        from megatron_rcpa.models.fp8 import emulate_fp8_for_tests
        from megatron_rcpa.runtime.parallel import init_distributed, teardown

        init_distributed(1, 1, seed=1234)
        try:
            result["train_step"] = []
            cases = [(s, dict(batch=4, seq=2048, reps=max(5, args.reps // 5))) for s in TRAIN_SHAPES]
            if args.quick:  # the wiring only: tiny shapes on the emulation, the times mean nothing
                cases = [((64, 2, 128, 4, 2), dict(batch=2, seq=16, reps=1, vocab=301))]
            for shape, kw in cases:
                with emulate_fp8_for_tests() if not CUDA else contextlib.nullcontext():
                    result["train_step"].append(train_step_case(*shape, **kw))
                show(result["train_step"][-1])
                save()
        finally:
            teardown()

    # numerics first (the acceptance check), then the ratios
    for name, fn, skip in (("gemm", gemm, args.skip_gemm), ("loss_curve", loss, args.skip_loss),
                           ("train_step", train, args.skip_train)):
        if not skip:
            section(name, fn)
    save()
    print(f"wrote {path}" + (f"; sections that failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
