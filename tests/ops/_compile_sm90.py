"""Compile every Triton kernel of megatron_rcpa.ops for an NVIDIA target (default sm_90) WITHOUT a GPU.

The interpreter runs kernels as Python and so misses what only the compiler enforces (loop-carried types,
early returns, constexpr branches, dtype rules of tl.math). This script takes the real compile path
(TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas bundled in the triton wheel) for each kernel with the
argument specialisation a real launch gets (16-divisible pointers, strides and sizes), and checks that
the two row-streaming kernels use 16-byte vector loads. Must run with TRITON_INTERPRET unset.

    python tests/ops/_compile_sm90.py [--arch 90]     # prints one JSON line per variant; rc 1 on failure
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run with TRITON_INTERPRET unset: the interpreter replaces the compiler")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from megatron_rcpa.algo.registry import ADVANTAGE_ESTIMATORS, AGG_PER_TOKEN, AGG_UNIFORM, KL_ESTIMATORS  # noqa: E402
from megatron_rcpa.ops import advantages as A  # noqa: E402
from megatron_rcpa.ops import logprob as L  # noqa: E402
from megatron_rcpa.ops import rcpa_loss as R  # noqa: E402

DIV = [["tt.divisibility", 16]]


def _row_types(dt):
    fwd = dict(x_ptr=f"*{dt}", stride_a="i32", stride_b="i32", D1="i32", tgt_ptr="*i64", mask_ptr="*u8",
               logp_ptr="*fp32", ent_ptr="*fp32", lse2_ptr="*fp32", out_ptr="*fp32", N="i32", n_valid="i32",
               vocab_start="i32", vocab_size="i32", scale2="fp32")
    bwd = dict(x_ptr=f"*{dt}", stride_a="i32", stride_b="i32", g_ptr=f"*{dt}", g_stride_a="i32",
               g_stride_b="i32", D1="i32", tgt_ptr="*i64", mask_ptr="*u8", lse2_ptr="*fp32", ent_ptr="*fp32",
               glogp_ptr="*fp32", gent_ptr="*fp32", gscale_ptr="*fp32", n_cols="i32", n_valid="i32",
               vocab_start="i32", vocab_size="i32", scale2="fp32", inv_temp="fp32")
    return fwd, bwd


def variants():
    """(name, kernel, arg types, constexprs, options, needs 16-byte vector loads)."""
    out = []
    for dt in ("bf16", "fp16", "fp32"):
        fwd, bwd = _row_types(dt)
        for final, ent, mask, d1 in ((True, True, True, 1), (True, False, False, None), (False, True, True, None),
                                     (False, False, True, 1)):
            c = dict(HAS_MASK=mask, WITH_ENT=ent, FINAL=final, BLOCK_V=2048)
            if d1 is not None:
                c["D1"] = d1
            out.append((f"fwd-{dt}-final{int(final)}-ent{int(ent)}-mask{int(mask)}-D1{d1}", L._fwd_kernel, fwd, c,
                        dict(num_warps=1, num_stages=4), True))
        for glogp, entg, gs, d1 in ((True, True, True, 1), (True, False, False, None), (False, True, False, 1)):
            c = dict(HAS_MASK=True, HAS_GLOGP=glogp, ENT_GRAD=entg, HAS_GSCALE=gs, BLOCK_V=8192)
            if d1 is not None:
                c["D1"] = d1
            out.append((f"bwd-{dt}-glogp{int(glogp)}-ent{int(entg)}-gs{int(gs)}-D1{d1}", L._bwd_kernel, bwd, c,
                        dict(num_warps=16, num_stages=4), True))
    merge = dict(stats_ptr="*fp32", tgt_ptr="*i64", mask_ptr="*u8", logp_ptr="*fp32", ent_ptr="*fp32",
                 lse2_ptr="*fp32", N="i32", vocab_size="i32", scale2="fp32")
    for ent in (True, False):
        out.append((f"tp_merge-ent{int(ent)}", L._tp_merge_kernel, merge,
                    dict(TP=8, HAS_MASK=True, WITH_ENT=ent, BLOCK=1024), dict(num_warps=4), False))
    tok = dict(logp_ptr="*fp32", ent_ptr="*fp32", old_ptr="*fp32", adv_ptr="*fp32", gen_ptr="*u8",
               ref_ptr="*fp32", imitw_ptr="*fp32", aggw_ptr="*fp32", seqlr_ptr="*fp32", dlogp_ptr="*fp32",
               dent_ptr="*fp32", dlr_ptr="*fp32", part_ptr="*fp32", N="i32", agg_scale="fp32", tm_scale="fp32",
               lo="fp32", hi="fp32", dual_c="fp32", beta="fp32", alpha="fp32", lambda_t="fp32")
    for kl in KL_ESTIMATORS.kernel_ids():  # every registered branch (the aggregation's two branches with it)
        for on in (True, False):
            c = dict(HAS_REF=on, KL=kl, USE_BETA=on, USE_ALPHA=on, HAS_CONS=on,
                     AGG=AGG_PER_TOKEN if on else AGG_UNIFORM, SEQ_RATIO=on, HAS_DUAL=on, NP=16, BLOCK=1024)
            out.append((f"token-k{kl}-all{int(on)}", R._token_kernel, tok, c, dict(num_warps=4), False))
    adv = dict(r_ptr="*fp32", order_ptr="*i64", start_ptr="*i64", size_ptr="*i64", params_ptr="*fp64",
               adv_ptr="*fp32", mean_ptr="*fp32", std_ptr="*fp32", zv_ptr="*u8")
    for est in ADVANTAGE_ESTIMATORS.kernel_ids():
        for bs in (True, False):
            out.append((f"group_adv-est{est}-batchstd{int(bs)}", A._group_adv_kernel, adv,
                        dict(EST=est, BATCH_STD=bs, BLOCK=32), dict(num_warps=4), False))
    return out


def compile_variant(target, fn, types, constexprs, options):
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in constexprs else types[name]
    cexpr = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    # a real launch marks 16-byte aligned pointers and 16-divisible integers (strides, sizes) this way
    attrs = {(i,): DIV for i, name in enumerate(fn.arg_names)
             if name not in constexprs and (types[name].startswith("*") or types[name].startswith("i"))}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cexpr, attrs=attrs), target=target,
                          options=options)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--only", default="", help="substring filter on the variant names")
    args = p.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for name, fn, types, constexprs, options, vector in variants():
        if args.only and args.only not in name:
            continue
        rec = {"variant": name}
        try:
            k = compile_variant(target, fn, types, constexprs, options)
            ptx = k.asm["ptx"]
            rec["cubin"] = "cubin" in k.asm
            rec["v4_loads"] = len(re.findall(r"ld\.global(?:\.[a-z0-9]+)*\.v4", ptx))
            if vector and rec["v4_loads"] == 0:
                raise AssertionError("no 16-byte vector load in a row-streaming kernel")
            rec["ok"] = True
        except Exception as e:  # noqa: BLE001 - report every variant
            rec["ok"] = False
            rec["error"] = f"{type(e).__name__}: {e}"[:2000]
            failed += 1
        print(json.dumps(rec), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
