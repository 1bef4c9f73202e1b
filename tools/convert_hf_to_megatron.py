#!/usr/bin/env python
"""Convert an HF checkpoint (safetensors, single or sharded) into a megatron_rcpa policy checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-VL-3B-Instruct --out ckpt/qwen25vl3b --dtype bf16

The model family (Qwen2.5-VL, LLaVA with a CLIP/SigLIP tower, Llama, Qwen2) is read from config.json.

The output (megatron dist_checkpointing + rcpa_checkpoint.json + hf_assets/) loads at ANY TP/PP; --tp/--pp
only choose how many processes share the work. The model is never built in memory (each tensor is made when it
is written: peak memory is a few times the largest tensor; a progress bar shows on a terminal). Any failure (bad
input, a full disk, permission denied, ...) exits with 2 and one ``error:`` line naming the
tensor/key/value/file; a failed conversion leaves no output directory.
"""

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rcpa.convert.cli import add_layout_args, run_cli  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True, help="HF model directory (config.json + *.safetensors)")
    parser.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
    parser.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None,
                        help="dtype of the megatron weights (default: the HF tensors' dtype)")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                        help="pad the vocabulary to a multiple of this (default 128: loads at any power-of-2 TP)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out (never the input, nor a directory holding it)")
    parser.add_argument("--verify", action="store_true",
                        help="check the sha256 of every input file against its manifest first (sizes are always "
                             "checked)")
    add_layout_args(parser, "used for the conversion (the result loads at any TP/PP)")
    args = parser.parse_args(argv)

    def body() -> int:
        from megatron_rcpa.convert.hf_to_megatron import convert_hf_to_megatron

        meta = convert_hf_to_megatron(args.hf_dir, args.out, dtype=args.dtype, tp=args.tp, pp=args.pp,
                                      make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                                      overwrite=args.overwrite, in_process=True, timeout=args.timeout,
                                      verify=args.verify)
        print(f"wrote {os.path.abspath(args.out)}: family={meta.family} dtype={meta.dtype} "
              f"vocab={meta.vocab_size} (padded {meta.padded_vocab_size}) assets={meta.assets}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
