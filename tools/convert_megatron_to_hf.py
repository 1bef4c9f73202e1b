#!/usr/bin/env python
"""Export a megatron_rcpa policy checkpoint as an HF directory (safetensors + index, config, tokenizer/processor).

    python tools/convert_megatron_to_hf.py --megatron-dir ckpt/qwen25vl3b --out hf/qwen25vl3b-rl

``from_pretrained`` loads the result. Tensors are written in the dtype of the HF checkpoint the megatron one
was converted from unless --dtype says otherwise. The model is never built in memory: the checkpoint is read a
decoder layer (or one other tensor) at a time and written out as it comes (a progress bar shows on a terminal).
Any failure (bad input, a damaged or tampered checkpoint, a
full disk, ...) exits with 2 and one ``error:`` line naming what is wrong; a failed export leaves no output.
"""

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rcpa.convert.cli import add_layout_args, run_cli  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megatron-dir", required=True, help="megatron_rcpa checkpoint directory")
    parser.add_argument("--out", required=True, help="output HF directory (must not exist)")
    parser.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None,
                        help="dtype of the HF tensors (default: the original HF checkpoint's)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out (never the input, nor a directory holding it)")
    parser.add_argument("--verify", action="store_true",
                        help="check the sha256 of every input file against its manifest first (sizes are always "
                             "checked)")
    add_layout_args(parser, "used to load the checkpoint for the export")
    args = parser.parse_args(argv)

    def body() -> int:
        from megatron_rcpa.convert.megatron_to_hf import convert_megatron_to_hf

        files = convert_megatron_to_hf(args.megatron_dir, args.out, dtype=args.dtype, tp=args.tp, pp=args.pp,
                                       max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                                       in_process=True, timeout=args.timeout, verify=args.verify)
        print(f"wrote {os.path.abspath(args.out)}: {len(files)} safetensors file(s)")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
