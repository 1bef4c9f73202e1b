#!/usr/bin/env python
"""Parity gate: the same image+text batch through HF and through the megatron checkpoint at --tp/--pp.

    python tools/verify_conversion.py --hf-dir Qwen2.5-VL-3B-Instruct --megatron-dir ckpt/qwen25vl3b --tp 2 --pp 2

Prints the per-position max |delta logit| and cosine, a per-tensor round-trip table (megatron -> HF names at
this layout vs the HF files) and the verdict. Exit 0: pass; 1: above tolerance or a tensor not bit-identical;
2: bad input or a failure (one ``error:`` line), including a checkpoint file whose size or sha256 differs from
its manifest. Runs tp*pp processes itself (gloo on CPU, NCCL on GPU).
"""

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rcpa.convert.cli import EXIT_FAILED, add_layout_args, run_cli  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True, help="the HF model directory the checkpoint came from")
    parser.add_argument("--megatron-dir", required=True, help="megatron_rcpa checkpoint directory")
    parser.add_argument("--atol", type=float, default=None,
                        help="largest allowed |delta logit| (default 1e-3 for fp32, 1.0 for bf16/fp16)")
    parser.add_argument("--min-cosine", type=float, default=None,
                        help="smallest allowed per-position cosine (default 0.99999 for fp32, 0.999 for bf16/fp16)")
    add_layout_args(parser, "of the megatron run")
    args = parser.parse_args(argv)

    def body() -> int:
        from megatron_rcpa.convert.verify import verify_conversion

        report = verify_conversion(args.hf_dir, args.megatron_dir, tp=args.tp, pp=args.pp, atol=args.atol,
                                   min_cosine=args.min_cosine, in_process=True, timeout=args.timeout)
        print(report.format())
        return 0 if report.passed else EXIT_FAILED

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
