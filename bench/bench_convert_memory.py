"""Peak memory of the two converters on a bf16 Qwen2 of a few hundred MB (CPU; no GPU needed).

    python bench/bench_convert_memory.py [--work /tmp/convmem] [--hidden 1024 --layers 12 --vocab 32000]
                                         [--repo OTHER_CHECKOUT]   # measure another checkout's tools

Saves the model (once), then runs ``tools/convert_hf_to_megatron.py`` and ``tools/convert_megatron_to_hf.py`` each
in a fresh process and reports its peak RSS (``ru_maxrss`` of the finished child), next to the baseline of a process
that only imports what the tools import. Prints one JSON line per measurement.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_mb(cmd):
    """Peak RSS (MB) and wall seconds of ``cmd`` run in a fresh wrapper (so RUSAGE_CHILDREN is this child's)."""
    code = ("import resource, subprocess, sys, time; t = time.time(); rc = subprocess.call(sys.argv[1:]); "
            "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.time() - t)")
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, check=True)
    rc, kb, secs = out.stdout.split()[-3:]
    if rc != "0":
        raise SystemExit(f"{cmd} failed (exit {rc}): {out.stderr[-2000:]}")
    return int(kb) / 1024, float(secs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/convmem")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--label", default="")
    p.add_argument("--repo", default=ROOT, help="checkout whose tools/ (and package) are measured")
    args = p.parse_args()
    hf = os.path.join(args.work, f"hf_{args.hidden}_{args.layers}_{args.vocab}")
    if not os.path.isdir(hf):
        import torch

        sys.path.insert(0, ROOT)
        from megatron_rcpa.models import families

        families.get("qwen2").save_tiny_hf(hf, seed=0, dtype=torch.bfloat16, hidden_size=args.hidden,
                                           intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                                           num_attention_heads=16, num_key_value_heads=4, vocab_size=args.vocab,
                                           tie_word_embeddings=False)
    size = sum(os.path.getsize(os.path.join(hf, f)) for f in os.listdir(hf) if f.endswith(".safetensors")) / 2**20
    ckpt, back = os.path.join(args.work, "megatron"), os.path.join(args.work, "back")
    for d in (ckpt, back):
        shutil.rmtree(d, ignore_errors=True)
    tools = os.path.join(os.path.abspath(args.repo), "tools")
    env_base = [sys.executable, "-c", "import torch, transformers, megatron.core, safetensors; "
                "import megatron_rcpa.convert.hf_to_megatron, megatron_rcpa.convert.megatron_to_hf"]
    base, _ = peak_mb(env_base)
    imp, t_imp = peak_mb([sys.executable, os.path.join(tools, "convert_hf_to_megatron.py"), "--hf-dir", hf,
                          "--out", ckpt])
    exp, t_exp = peak_mb([sys.executable, os.path.join(tools, "convert_megatron_to_hf.py"),
                          "--megatron-dir", ckpt, "--out", back])
    row = {"label": args.label, "checkpoint_mb": round(size), "baseline_mb": round(base),
           "hf_to_megatron_peak_mb": round(imp), "hf_to_megatron_s": round(t_imp, 1),
           "megatron_to_hf_peak_mb": round(exp), "megatron_to_hf_s": round(t_exp, 1),
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
