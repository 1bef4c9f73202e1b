"""Benchmark of the masked log-prob kernels and the fused RCPA loss (PERFORMANCE_TARGETS sections A and C).

For every implementation: forward (under no_grad, as for old/ref log-probs) and forward+backward time
(median of triton.testing.do_bench), peak extra memory of one call beyond its inputs, and the relative
error against a float64 reference (log-probs/loss over all tokens, gradient on a slice of rows), printed
next to the time. Shapes: N=16384 (16 x 1024), V=152064 (Qwen2.5 vocabulary), and one tensor-parallel TP=8
shard of the same bytes (N=131072, V_local=19008), bf16 logits, 20% of the tokens masked.

Implementations: ours (masked_logprob with/without entropy, in-place backward, on a strided [B, L+1, V]
view; rcpa_loss_from_logits), torch eager (log_softmax(x.float()).gather), torch.compile of it,
megatron-core vocab_parallel_cross_entropy (if importable), Liger-Kernel's LigerCrossEntropyLoss,
fused_selective_log_softmax and triton_grpo_loss (if installed), and group_advantages vs its reference.
The 3-pass floor (read logits fwd, read + write in bwd) uses the device-copy bandwidth measured here.

The table comes last; JSON goes to $OUT/bench_logprob.json ($OUT defaults to ./bench/results/local).

    python bench/bench_logprob.py              # on a GPU: the full shapes
    python bench/bench_logprob.py --sweep      # also sweep BLOCK_V / num_warps of our two row kernels
    python bench/bench_logprob.py --quick      # small shapes; also runs on a CPU in Triton's interpreter
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402

from megatron_rcpa.algo.advantages import compute_advantages  # noqa: E402
from megatron_rcpa.algo.config import LossConfig  # noqa: E402
from megatron_rcpa.algo.loss import count_tokens, rcpa_loss  # noqa: E402
from megatron_rcpa.ops import group_advantages, masked_logprob, rcpa_loss_from_logits  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
GIB = float(2**30)


# ---------------------------------------------------------------------------------------------------------
# measurement helpers
# ---------------------------------------------------------------------------------------------------------


def sync():
    if CUDA:
        torch.cuda.synchronize()


def time_ms(fn, grad_to_none=(), rep_ms=200):
    if CUDA:
        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, grad_to_none=list(grad_to_none),
                                             return_mode="median"))
    times = []
    for i in range(3):  # CPU smoke: 1 warm-up + 2 timed
        for t in grad_to_none:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_gib(fn, grad_to_none=()):
    """Extra memory allocated during one call beyond what was allocated before (inputs)."""
    if not CUDA:
        return None
    for t in grad_to_none:
        t.grad = None
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    sync()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    for t in grad_to_none:
        t.grad = None
    return peak / GIB


def copy_bandwidth():
    """Device copy bandwidth, bytes read + written per second."""
    if not CUDA:
        return None
    n = 1 << 30  # 1 GiB
    a = torch.empty(n, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=10, rep=200, return_mode="median")
    a = b = None  # free
    return 2 * n / (ms * 1e-3)


def rel_err(a, b):
    a = a.detach().double()
    b = b.detach().double().to(a.device)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------------------------------------


def ref_rows(x, t, mask, temperature=1.0, with_grad=False):
    """float64 (logp, entropy) of rows x [R, V]; masked positions 0."""
    x = x.double() / temperature
    lsm = torch.log_softmax(x, -1)
    lp = lsm.gather(-1, t.long()[:, None])[:, 0]
    h = -(lsm.exp() * lsm).sum(-1)
    z = torch.zeros((), dtype=torch.float64, device=x.device)
    return torch.where(mask, lp, z), torch.where(mask, h, z)


def ref_all(x2d, t, mask, chunk=256):
    """float64 logp and entropy of every row, in chunks (never the whole float64 matrix)."""
    lps, hs = [], []
    with torch.no_grad():
        for s in range(0, x2d.shape[0], chunk):
            lp, h = ref_rows(x2d[s:s + chunk], t[s:s + chunk], mask[s:s + chunk])
            lps.append(lp)
            hs.append(h)
    return torch.cat(lps), torch.cat(hs)


# ---------------------------------------------------------------------------------------------------------
# one shape
# ---------------------------------------------------------------------------------------------------------


class Problem:
    def __init__(self, name, b, seq, v, slice_rows, seed=0):
        self.name, self.b, self.l, self.v = name, b, seq, v
        self.n = b * seq
        g = torch.Generator(device=DEV).manual_seed(seed)
        # ext: [B, L+1, V] (the layout Liger's GRPO loss wants); x: the same logits, contiguous [N, V]
        self.ext = (torch.randn(b, seq + 1, v, device=DEV, generator=g) * 2).to(torch.bfloat16)
        self.x = self.ext[:, :seq].reshape(self.n, v).contiguous()
        self.t = torch.randint(0, v, (self.n,), device=DEV, generator=g)
        self.mask = torch.rand(self.n, device=DEV, generator=g) >= 0.2  # 20% masked
        self.w = torch.randn(self.n, device=DEV, generator=g)  # d loss / d logp
        self.wh = torch.randn(self.n, device=DEV, generator=g) * 0.1  # d loss / d entropy
        self.adv_seq = torch.randn(b, device=DEV, generator=g)
        self.adv = self.adv_seq[:, None].expand(b, seq).reshape(-1).contiguous()
        self.slice = min(slice_rows, self.n)
        lp64, h64 = ref_all(self.x, self.t, self.mask)
        self.lp64, self.h64 = lp64, h64
        noise = lambda s: (torch.randn(self.n, device=DEV, generator=g, dtype=torch.float64) * s)
        self.old = torch.where(self.mask, lp64 + noise(0.2), lp64).float()
        self.ref = torch.where(self.mask, lp64 + noise(0.2), lp64).float()
        self.bytes = self.x.numel() * self.x.element_size()

    def ref_grad_slice(self, entropy=False):
        xs = self.x[: self.slice].detach().double().requires_grad_()
        lp, h = ref_rows(xs, self.t[: self.slice], self.mask[: self.slice])
        loss = (lp * self.w[: self.slice]).sum() + ((h * self.wh[: self.slice]).sum() if entropy else 0.0)
        loss.backward()
        return xs.grad

    def loss_reference(self, cfg):
        """float64 RCPA loss over all tokens, and the float64 gradient of the slice rows."""
        lp = self.lp64.clone().requires_grad_()
        loss, _ = rcpa_loss(lp, self.old, self.adv, self.mask, config=cfg, ref_logp=self.ref)
        (wlp,) = torch.autograd.grad(loss, [lp])
        xs = self.x[: self.slice].detach().double().requires_grad_()
        lps, _ = ref_rows(xs, self.t[: self.slice], self.mask[: self.slice])
        (lps * wlp[: self.slice]).sum().backward()
        return loss.detach(), xs.grad


def run_case(results, prob, impl, kind, fn_fwd=None, fn_fb=None, *, leaf=None, ref_out=None, ref_grad=None,
             out_of=None, grad_of=None, rep_ms=200, floor=None, note=""):
    """Measure one implementation: correctness first (one call), then time and peak memory."""
    for pass_name, fn in (("fwd", fn_fwd), ("fwd+bwd", fn_fb)):
        if fn is None:
            continue
        row = {"shape": prob.name, "impl": impl, "kind": kind, "pass": pass_name, "note": note}
        try:
            grads = [leaf] if (leaf is not None and pass_name == "fwd+bwd") else []
            for t in grads:
                t.grad = None
            out = fn()
            sync()
            if out_of is not None and ref_out is not None:
                row["rel_err_out"] = rel_err(out_of(out), ref_out)
            if pass_name == "fwd+bwd" and grad_of is not None and ref_grad is not None:
                row["rel_err_grad"] = rel_err(grad_of(), ref_grad)
            del out
            row["ms"] = time_ms(fn, grads, rep_ms)
            row["peak_gib"] = peak_gib(fn, grads)
            if floor is not None:
                f = floor[pass_name]
                row["floor_ms"] = f
                row["x_floor"] = row["ms"] / f if f else None
        except Exception as e:  # noqa: BLE001 - one failing variant must not stop the run
            row["error"] = f"{type(e).__name__}: {e}"[:300]
            traceback.print_exc()
        finally:
            for t in ([leaf] if leaf is not None else []):
                t.grad = None
        results.append(row)
        print(_fmt_row(row), flush=True)


def bench_shape(prob, results, args, bw):
    b, seq, v, n = prob.b, prob.l, prob.v, prob.n
    floor = None
    if bw:
        one = prob.bytes / bw * 1e3
        floor = {"fwd": one, "fwd+bwd": 3 * one}
    rep = args.rep_ms
    ngrad = prob.ref_grad_slice(False)
    egrad = prob.ref_grad_slice(True)
    s = prob.slice
    x = prob.x.detach().requires_grad_()
    t, mask, w, wh = prob.t, prob.mask, prob.w, prob.wh

    # ---------------- ours: masked_logprob ----------------
    def ours(ent, inplace=False, xx=None):
        xx = x if xx is None else xx

        def fwd():
            with torch.no_grad():
                return masked_logprob(xx, t, mask, return_entropy=ent)

        def fb():
            out = masked_logprob(xx, t, mask, return_entropy=ent, inplace_backward=inplace)
            if ent:
                lp, h = out
                ((lp * w).sum() + (h * wh).sum()).backward()
            else:
                lp = out
                (lp * w).sum().backward()
            return lp.detach()
        return fwd, fb

    lp_of = lambda o: (o[0] if isinstance(o, tuple) else o).reshape(-1)
    fwd, fb = ours(False)
    run_case(results, prob, "ours masked_logprob", "logprob", fwd, fb, leaf=x, ref_out=prob.lp64, out_of=lp_of,
             ref_grad=ngrad, grad_of=lambda: x.grad[:s], rep_ms=rep, floor=floor)
    fwd, fb = ours(True)
    run_case(results, prob, "ours masked_logprob +entropy", "logprob", fwd, fb, leaf=x, ref_out=prob.lp64,
             out_of=lp_of, ref_grad=egrad, grad_of=lambda: x.grad[:s], rep_ms=rep, floor=floor)

    # strided [B, L, V] view of the [B, L+1, V] storage (Liger's layout): no copy on our side
    xe = prob.ext.detach().clone().requires_grad_()
    ve = lambda: xe[:, :seq]

    def strided_fb():
        lp = masked_logprob(ve(), t.view(b, seq), mask.view(b, seq))
        (lp.reshape(-1) * w).sum().backward()
        return lp.detach()
    run_case(results, prob, "ours masked_logprob strided view", "logprob", None, strided_fb, leaf=xe,
             ref_out=prob.lp64, out_of=lp_of, ref_grad=ngrad, grad_of=lambda: xe.grad[0, :s] if s <= seq else
             xe.grad[:, :seq].reshape(n, v)[:s], rep_ms=rep, floor=floor)
    xe = None  # free the copy

    # in-place backward: on a private copy (it is overwritten by its gradient at every call)
    xi = prob.x.detach().clone()

    def inplace_fb():
        leaf = xi.requires_grad_() if not xi.requires_grad else xi
        y = leaf.view_as(leaf)  # a non-leaf alias: the gradient handed upstream is the logits storage
        lp = masked_logprob(y, t, mask, inplace_backward=True)
        (lp * w).sum().backward()
        return lp.detach()
    run_case(results, prob, "ours masked_logprob inplace", "logprob", None, inplace_fb, leaf=xi,
             ref_out=prob.lp64, out_of=lp_of, ref_grad=ngrad, grad_of=lambda: xi.grad[:s], rep_ms=rep, floor=floor)
    xi = None  # free the copy

    # ---------------- torch eager / compile ----------------
    def torch_logp(xx, tt, mm):
        lp = torch.log_softmax(xx.float(), dim=-1).gather(-1, tt[:, None]).squeeze(-1)
        return torch.where(mm, lp, torch.zeros_like(lp))

    def torch_variant(f):
        def fwd():
            with torch.no_grad():
                return f(x, t, mask)

        def fbw():
            lp = f(x, t, mask)
            (lp * w).sum().backward()
            return lp.detach()
        return fwd, fbw

    fwd, fb = torch_variant(torch_logp)
    run_case(results, prob, "torch eager log_softmax.gather", "logprob", fwd, fb, leaf=x, ref_out=prob.lp64,
             out_of=lp_of, ref_grad=ngrad, grad_of=lambda: x.grad[:s], rep_ms=rep, floor=floor)
    if args.compile and CUDA:
        compiled = torch.compile(torch_logp, dynamic=False)
        fwd, fb = torch_variant(compiled)
        run_case(results, prob, "torch.compile log_softmax.gather", "logprob", fwd, fb, leaf=x,
                 ref_out=prob.lp64, out_of=lp_of, ref_grad=ngrad, grad_of=lambda: x.grad[:s], rep_ms=rep,
                 floor=floor)

    # ---------------- megatron-core ----------------
    mg = megatron_vpce()
    if mg is not None:
        vpce, group = mg

        def mg_fwd():
            with torch.no_grad():
                return -vpce(x[None], t[None], tp_group=group)[0] * mask

        def mg_fb():
            lp = -vpce(x[None], t[None], tp_group=group)[0] * mask
            (lp * w).sum().backward()
            return lp.detach()
        run_case(results, prob, "megatron vocab_parallel_cross_entropy", "logprob", mg_fwd, mg_fb, leaf=x,
                 ref_out=prob.lp64, out_of=lp_of, ref_grad=ngrad, grad_of=lambda: x.grad[:s], rep_ms=rep,
                 floor=floor)
    else:
        results.append({"shape": prob.name, "impl": "megatron vocab_parallel_cross_entropy",
                        "note": "megatron-core not importable"})

    # ---------------- Liger ----------------
    liger = liger_imports()
    if "ce" in liger:
        xl = prob.x.detach().clone().requires_grad_()  # Liger CE writes its gradient into the input
        ce = liger["ce"](reduction="none")
        tgt = torch.where(mask, t, torch.full_like(t, -100))

        def ce_fb():
            nll = ce(xl, tgt)
            (-nll * w).sum().backward()
            return (-nll).detach()
        run_case(results, prob, "liger LigerCrossEntropyLoss(none)", "logprob", None, ce_fb, leaf=xl,
                 ref_out=prob.lp64, out_of=lp_of, ref_grad=ngrad, grad_of=lambda: xl.grad[:s], rep_ms=rep,
                 floor=floor, note="computes the gradient in its forward, in place")
        xl = None  # free the copy
    if "fsls" in liger:
        ids = t.view(b, seq)
        msk = mask.view(b, seq)

        def fsls_fwd():
            return liger["fsls"](prob.ext, ids, 1.0, mask=msk)
        run_case(results, prob, "liger fused_selective_log_softmax", "logprob", fsls_fwd, None,
                 ref_out=prob.lp64, out_of=lp_of, rep_ms=rep, floor=floor)
    if not liger:
        results.append({"shape": prob.name, "impl": "liger", "note": "liger-kernel not installed"})

    # ---------------- the whole loss ----------------
    cfg = LossConfig(eps_low=0.2, eps_high=0.4, beta=0.04, kl_type="k3")  # Liger GRPO's defaults, T = 1
    loss64, lgrad = prob.loss_reference(cfg)
    counts = count_tokens(mask)  # global counts, as the trainer passes them (no host sync in the loss)

    def ours_loss(inplace, xx):
        def fwd():
            with torch.no_grad():
                return rcpa_loss_from_logits(xx, t, prob.old, prob.adv, mask, config=cfg, ref_logp=prob.ref,
                                             counts=counts)[0]

        def fbw():
            y = xx.view_as(xx) if inplace else xx
            loss, _ = rcpa_loss_from_logits(y, t, prob.old, prob.adv, mask, config=cfg, ref_logp=prob.ref,
                                            counts=counts, inplace_backward=inplace)
            loss.backward()
            return loss.detach()
        return fwd, fbw

    fwd, fb = ours_loss(False, x)
    run_case(results, prob, "ours rcpa_loss_from_logits", "loss", fwd, fb, leaf=x, ref_out=loss64,
             out_of=lambda o: o, ref_grad=lgrad, grad_of=lambda: x.grad[:s], rep_ms=rep, floor=floor)
    xi = prob.x.detach().clone().requires_grad_()
    _, fb = ours_loss(True, xi)
    run_case(results, prob, "ours rcpa_loss_from_logits inplace", "loss", None, fb, leaf=xi, ref_out=loss64,
             out_of=lambda o: o, ref_grad=lgrad, grad_of=lambda: xi.grad[:s], rep_ms=rep, floor=floor)
    xi = None  # free the copy

    def torch_loss_fb():
        lp = torch_logp(x, t, mask)
        loss, _ = rcpa_loss(lp, prob.old, prob.adv, mask, config=cfg, ref_logp=prob.ref, counts=counts)
        loss.backward()
        return loss.detach()
    run_case(results, prob, "torch eager + algo rcpa_loss", "loss", None, torch_loss_fb, leaf=x, ref_out=loss64,
             out_of=lambda o: o, ref_grad=lgrad, grad_of=lambda: x.grad[:s], rep_ms=rep, floor=floor)

    if "grpo" in liger:
        xg = prob.ext.detach().clone().requires_grad_()
        ids = t.view(b, seq)
        msk = mask.view(b, seq)

        def grpo_fb():
            out = liger["grpo"](xg, prob.old.view(b, seq), prob.ref.view(b, seq), ids, prob.adv_seq, msk,
                                temperature=1.0, beta=0.04, eps_low=0.2, eps_high=0.4, inplace=True)
            per_tok = out[0]
            loss = (per_tok * msk).sum() / msk.sum()
            loss.backward()
            return loss.detach()
        run_case(results, prob, "liger triton_grpo_loss (inplace)", "loss", None, grpo_fb, leaf=xg,
                 ref_out=loss64, out_of=lambda o: o, ref_grad=lgrad,
                 grad_of=lambda: xg.grad[:, :seq].reshape(n, v)[:s], rep_ms=rep, floor=floor,
                 note="TP=1 only; token-level ratio only")
        xg = None  # free the copy


def bench_advantages(results, quick, rep_ms):
    g = torch.Generator(device=DEV).manual_seed(1)
    n_groups, size = (16, 8) if quick else (512, 8)
    ids = torch.arange(n_groups, device=DEV).repeat_interleave(size) * 7919 - 13
    ids = ids[torch.randperm(ids.numel(), device=DEV, generator=g)]
    rewards = (torch.rand(ids.numel(), device=DEV, generator=g) > 0.5).float()
    want = compute_advantages(rewards, ids)
    for name, fn in (("ours group_advantages", lambda: group_advantages(rewards, ids)),
                     ("algo compute_advantages (torch)", lambda: compute_advantages(rewards, ids))):
        row = {"shape": f"advantages N={ids.numel()} G={size}", "impl": name, "kind": "advantages", "pass": "fwd"}
        try:
            got = fn()
            row["rel_err_out"] = rel_err(got.advantages, want.advantages)
            row["ms"] = time_ms(fn, (), rep_ms)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        results.append(row)
        print(_fmt_row(row), flush=True)


def sweep(prob, args):
    """Time our forward (no_grad) and fwd+bwd over launch configurations (BLOCK_V, num_warps, num_stages) of
    the two row kernels; the defaults live in megatron_rcpa/ops/_triton_utils.py:vocab_launch_config."""
    rows = []
    x = prob.x.detach().requires_grad_()
    fwd_cfgs = [(1024, 1, 4), (2048, 1, 4), (2048, 1, 1), (2048, 1, 2), (4096, 1, 4), (2048, 2, 4), (4096, 4, 3),
                (8192, 8, 3), (8192, 16, 3)]
    bwd_cfgs = [(2048, 1, 4), (4096, 2, 4), (4096, 4, 4), (8192, 8, 4), (8192, 16, 4), (8192, 16, 1),
                (16384, 16, 4), (8192, 32, 4)]
    keys = [f"MEGATRON_RCPA_{k}_{f}" for k in ("FWD", "BWD") for f in ("BLOCK_V", "NUM_WARPS", "NUM_STAGES")]
    saved = {k: os.environ.get(k) for k in keys}

    def set_cfg(kind, cfg):
        for f, val in zip(("BLOCK_V", "NUM_WARPS", "NUM_STAGES"), cfg):
            os.environ[f"MEGATRON_RCPA_{kind}_{f}"] = str(val)

    try:
        for cfg in fwd_cfgs:
            set_cfg("FWD", cfg)

            def fwd():
                with torch.no_grad():
                    return masked_logprob(x, prob.t, prob.mask)
            ms = time_ms(fwd, (), args.rep_ms)
            rows.append({"shape": prob.name, "kernel": "fwd", "block_v": cfg[0], "num_warps": cfg[1],
                         "num_stages": cfg[2], "ms": ms})
            print(f"sweep {prob.name} fwd BLOCK_V={cfg[0]} warps={cfg[1]} stages={cfg[2]}: {ms:.3f} ms", flush=True)
        for k in keys[:3]:
            os.environ.pop(k, None)
        for cfg in bwd_cfgs:
            set_cfg("BWD", cfg)

            def fb():
                lp = masked_logprob(x, prob.t, prob.mask)
                (lp * prob.w).sum().backward()
                return lp
            ms = time_ms(fb, [x], args.rep_ms)
            rows.append({"shape": prob.name, "kernel": "fwd+bwd", "block_v": cfg[0], "num_warps": cfg[1],
                         "num_stages": cfg[2], "ms": ms})
            print(f"sweep {prob.name} fwd+bwd (default fwd) BWD BLOCK_V={cfg[0]} warps={cfg[1]} stages={cfg[2]}: "
                  f"{ms:.3f} ms", flush=True)
    finally:
        for k, val in saved.items():
            if val is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = val
    return rows


# ---------------------------------------------------------------------------------------------------------
# optional peers
# ---------------------------------------------------------------------------------------------------------

_MG = None


def megatron_vpce():
    """(vocab_parallel_cross_entropy, a one-rank group) or None when megatron-core is not importable."""
    global _MG
    if _MG is not None:
        return _MG or None
    try:
        import torch.distributed as dist
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        if not dist.is_initialized():
            store = dist.HashStore()
            dist.init_process_group("nccl" if CUDA else "gloo", store=store, rank=0, world_size=1)
        group = dist.new_group([0])
        _MG = (vocab_parallel_cross_entropy, group)
    except Exception as e:  # noqa: BLE001
        print(f"megatron-core vocab_parallel_cross_entropy unavailable: {type(e).__name__}: {e}")
        _MG = False
    return _MG or None


def liger_imports():
    out = {}
    with contextlib.suppress(Exception):
        from liger_kernel.transformers import LigerCrossEntropyLoss

        out["ce"] = LigerCrossEntropyLoss
    for mod in ("liger_kernel.transformers.grpo_loss", "liger_kernel.ops.grpo_loss"):
        with contextlib.suppress(Exception):
            m = __import__(mod, fromlist=["*"])
            if "grpo" not in out and hasattr(m, "triton_grpo_loss"):
                out["grpo"] = m.triton_grpo_loss
            if "fsls" not in out and hasattr(m, "fused_selective_log_softmax"):
                out["fsls"] = m.fused_selective_log_softmax
    return out


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------


def _f(v, spec):
    return "-" if v is None else format(v, spec)


def _fmt_row(r):
    if "error" in r:
        return f"{r.get('shape', ''):<22} {r.get('impl', ''):<40} {r.get('pass', ''):<8} ERROR {r['error']}"
    if "ms" not in r:
        return f"{r.get('shape', ''):<22} {r.get('impl', ''):<40} {'':<8} skipped: {r.get('note', '')}"
    return (f"{r['shape']:<22} {r['impl']:<40} {r['pass']:<8} {r['ms']:>9.3f} ms "
            f"x_floor {_f(r.get('x_floor'), '>6.2f')}  peak {_f(r.get('peak_gib'), '>6.2f')} GiB  "
            f"err_out {_f(r.get('rel_err_out'), '.1e')}  err_grad {_f(r.get('rel_err_grad'), '.1e')}")


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="--quick runs small shapes and works on a CPU-only machine (Triton interpreter, "
               "TRITON_INTERPRET=1 is set automatically when no GPU is found): a smoke test, not a measurement.")
    p.add_argument("--quick", action="store_true", help="small shapes (CPU smoke test under the interpreter)")
    p.add_argument("--shapes", default="main,tp8", help="comma list of: main (N=16384, V=152064), "
                   "tp8 (N=131072, V_local=19008)")
    p.add_argument("--sweep", action="store_true", help="also sweep BLOCK_V / num_warps of our row kernels")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time per measurement (ms)")
    p.add_argument("--slice-rows", type=int, default=256, help="rows whose gradient is checked in float64")
    p.add_argument("--out", default=os.environ.get("OUT", os.path.join("bench", "results", "local")),
                   help="output folder of the JSON (default: $OUT or ./bench/results/local)")
    args = p.parse_args(argv)

    shapes = {
        "main": ("N=16384 V=152064", 16, 1024, 152064),
        "tp8": ("TP8 shard N=131072 V=19008", 128, 1024, 19008),
    }
    if args.quick:
        shapes = {"main": ("quick N=64 V=5000", 2, 32, 5000), "tp8": ("quick shard N=128 V=1201", 4, 32, 1201)}
    bw = copy_bandwidth()
    env = {
        "device": torch.cuda.get_device_name() if CUDA else f"cpu ({platform.processor() or 'unknown'}), "
                                                            "Triton interpreter",
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "copy_bandwidth_TBps": None if bw is None else bw / 1e12, "quick": args.quick,
    }
    print(json.dumps(env))
    results, sweeps = [], []
    for key in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        name, b, seq, v = shapes[key]
        prob = Problem(name, b, seq, v, args.slice_rows)
        print(f"== {name}: logits {prob.bytes / GIB:.2f} GiB bf16", flush=True)
        bench_shape(prob, results, args, bw)
        if args.sweep and CUDA:
            sweeps += sweep(prob, args)
        del prob
        if CUDA:
            torch.cuda.empty_cache()
    bench_advantages(results, args.quick, args.rep_ms)

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_logprob.json")
    with open(path, "w") as f:
        json.dump({"env": env, "results": results, "sweep": sweeps}, f, indent=1)
    print(f"\nJSON: {path}")
    print("\n" + "=" * 150)
    print(f"device: {env['device']}  copy bandwidth: {_f(env['copy_bandwidth_TBps'], '.2f')} TB/s  "
          "(floor: fwd = 1 read of the logits, fwd+bwd = 3 passes)")
    for r in results:
        print(_fmt_row(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
