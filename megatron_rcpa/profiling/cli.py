"""``tools/profile_throughput.py``: per-phase throughput / MFU of real RCPA steps, BF16 and FP8.

    python tools/profile_throughput.py --config run.yaml --steps 5 [key=value ...]
    torchrun --nproc_per_node 8 tools/profile_throughput.py --config run.yaml --steps 10 --compare bf16,fp8
    python tools/profile_throughput.py --config run.yaml --compare bf16,fp8 --fp8-backend torchao --fp8-recipe rowwise

Runs ``--warmup`` + ``--steps`` RCPA steps (rollout, log-prob recompute, train forward+backward, optimizer; see
:mod:`megatron_rcpa.profiling.runner`) and reports, per phase, the median time, tokens/s/GPU, model TFLOP/s/GPU
(:mod:`megatron_rcpa.profiling.flops`), MFU against the card's dense peak (:mod:`megatron_rcpa.profiling.peaks`)
and peak memory: a table on stdout, ``profile_throughput.json`` (schema in :mod:`megatron_rcpa.profiling.report`)
and ``profile_throughput.png`` under ``--out-dir``.

FP8 (:mod:`megatron_rcpa.profiling.precision`): ``--fp8-backend te`` (Transformer Engine) or ``torchao``
(``torchao.float8`` GEMMs in the local spec's linears); ``auto`` picks te when it imports. It needs a CUDA GPU of
compute capability 8.9+; on a CPU it stops at once.

Exit status: 0 done; 2 bad arguments or configuration, or FP8 asked for where it cannot run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import List, Optional

from megatron_rcpa.profiling.flops import ATTENTION_MODES
from megatron_rcpa.profiling.peaks import PEAKS
from megatron_rcpa.profiling.precision import (
    FP8_BACKENDS,
    FP8_FORMATS,
    FP8_RECIPES,
    PRECISIONS,
    TORCHAO_RECIPES,
    PrecisionError,
)

__all__ = ["EXIT_BAD_INPUT", "build_parser", "main"]

EXIT_BAD_INPUT = 2
JSON_NAME = "profile_throughput.json"
PNG_NAME = "profile_throughput.png"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="profile_throughput.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Overrides: key=value pairs after the flags, as for rcpa-train "
                                       "(e.g. model.tiny=true rollout.max_new_tokens=128).")
    p.add_argument("--config", required=True, help="an rcpa-train YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    p.add_argument("--steps", type=int, default=5, help="measured steps (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps before measuring (default 1)")
    p.add_argument("--precision", default="bf16", help=f"one of {', '.join(PRECISIONS)} (default bf16)")
    p.add_argument("--fp8-backend", default=None,
                   help=f"FP8 backend: {', '.join(FP8_BACKENDS)} (default auto: te when transformer_engine imports, "
                        "else torchao)")
    p.add_argument("--fp8-recipe", default=None,
                   help=f"FP8 scaling recipe. te: {', '.join(FP8_RECIPES)} (default delayed; mxfp8 needs Blackwell); "
                        f"torchao: {', '.join(TORCHAO_RECIPES)} (default tensorwise)")
    p.add_argument("--fp8-format", default=None,
                   help=f"FP8 format, te only: {', '.join(FP8_FORMATS)} (default hybrid for delayed/tensorwise, e4m3 "
                        "for blockwise/mxfp8)")
    p.add_argument("--compare", default=None, metavar="A,B",
                   help="run several precisions in turn and report them side by side, e.g. bf16,fp8")
    p.add_argument("--prompt-len", type=int, default=64, help="text tokens per prompt (default 64)")
    p.add_argument("--prefix-len", type=int, default=0,
                   help="of them, how many are the forced RCPA prefix (imitation term; default 0)")
    p.add_argument("--attention-flops", choices=ATTENTION_MODES, default="full",
                   help="FLOP convention for attention (default full: what unfused attention computes)")
    p.add_argument("--loss-impl", choices=("auto", "triton", "torch"), default="auto",
                   help="RCPA loss kernels (auto: triton on a GPU, torch on a CPU)")
    p.add_argument("--gpu", choices=sorted(PEAKS), default=None, help="peak table entry (default: detected)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s per device for MFU (overrides the table; gives MFU on a CPU too)")
    p.add_argument("--load-weights", action="store_true",
                   help="load model.checkpoint's weights (bf16 only; default random weights of its architecture)")
    p.add_argument("--out-dir", default=None, help="where the JSON and PNG go (default <run.output_dir>/profile)")
    p.add_argument("--seed", type=int, default=1234)
    return p


def _quiet() -> None:
    for message in ("Apex is not installed", "Transformer Engine and Apex are not installed",
                    "absl.logging is not installed", ".*deprecated", ".*DEPRECATED", ".*experimental"):
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("megatron", "megatron.core", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _fail(message: str) -> int:
    print(f"profile_throughput.py: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet()
    import torch

    if not torch.cuda.is_available():  # triton kernels (if asked for) can only run in its interpreter here
        os.environ.setdefault("TRITON_INTERPRET", "1")

    from megatron_rcpa.profiling.peaks import detect_device
    from megatron_rcpa.profiling.precision import check_fp8_available, parse_precisions
    from megatron_rcpa.profiling.runner import ProfileSettings

    # Everything checkable is checked before megatron is imported or a model is built.
    try:
        runs = parse_precisions(args.precision, args.fp8_recipe, args.compare, args.fp8_format, args.fp8_backend)
        device = detect_device()
        check_fp8_available(runs, device)
        settings = ProfileSettings(steps=args.steps, warmup=args.warmup, prompt_len=args.prompt_len,
                                   prefix_len=args.prefix_len, attention=args.attention_flops,
                                   loss_impl=args.loss_impl, gpu=args.gpu, peak_tflops=args.peak_tflops,
                                   load_weights=args.load_weights, seed=args.seed)
        if args.peak_tflops is not None and args.peak_tflops <= 0:
            raise ValueError(f"--peak-tflops {args.peak_tflops}: must be > 0")
        from megatron_rcpa.train.config import load_config

        cfg = load_config(args.config, args.overrides)
    except (PrecisionError, ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))

    from megatron_rcpa.models.fp8 import Fp8Error
    from megatron_rcpa.profiling.report import build_report, format_table, plot_report, write_json
    from megatron_rcpa.profiling.runner import ProfileConfigError, megatron_session, profile_precision

    out_dir = args.out_dir or os.path.join(cfg.run.output_dir, "profile")
    try:
        with megatron_session(cfg.parallel.tp, cfg.parallel.pp, args.seed):
            rank = torch.distributed.get_rank()
            world = torch.distributed.get_world_size()
            log = print if rank == 0 else (lambda *a, **k: None)
            records, summary = [], {}
            for run in runs:
                record, summary = profile_precision(cfg, run, settings, device, log=log)
                records.append(record)
            if rank == 0:
                summary.update(config_path=os.path.abspath(args.config), overrides=list(args.overrides),
                               steps=args.steps, warmup_steps=args.warmup)
                report = build_report(device=dict(device.to_dict(), world_size=world), config=summary,
                                      runs=records, attention=args.attention_flops)
                print()
                print(format_table(report))
                json_path = write_json(report, os.path.join(out_dir, JSON_NAME))
                png_path = plot_report(report, os.path.join(out_dir, PNG_NAME))
                print(f"\nwrote {json_path}\nwrote {png_path}")
    except (PrecisionError, ProfileConfigError, Fp8Error) as exc:
        return _fail(str(exc))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
