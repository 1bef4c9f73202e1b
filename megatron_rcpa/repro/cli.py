"""``rcpa-repro``: the toy-scale reproduction of RCPA's claim, run by ``rcpa-train``, with a computed verdict.

    rcpa-repro --preset cpu --domains d1,d2 --seeds 0 --out runs/repro_cpu --report-dir docs/repro
    rcpa-repro --preset gpu --domains d1,d2 --seeds 0,1,2 --out runs/repro_gpu --report-dir docs/repro/gpu
    rcpa-repro ... --domain my_pkg.my_domains:d3      # a pluggable domain (a function returning a Domain)
    rcpa-repro ... --report-only                      # recompute verdict, report and plots from finished runs

Steps: write the data files; pretrain the base model (``run.mode=sft`` on the general mix until general
accuracy >= 0.98); run every arm x domain x seed from the base checkpoint; compute the token KL to the base at
every saved checkpoint; analyse; write ``verdict.json``, ``summary.json``, ``REPORT.md`` and ``plots/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import List, Optional

from megatron_rcpa.repro.arms import PRESETS, arms_for
from megatron_rcpa.repro.tasks import BUILTIN_DOMAINS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rcpa-repro", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--domains", default="d1,d2", help="comma-separated built-in domains (d1, d2) or module:function")
    p.add_argument("--domain", action="append", default=[], metavar="MODULE:FUNCTION",
                   help="a pluggable domain (zero-argument function returning megatron_rcpa.repro.tasks.Domain); "
                        "repeatable, added to --domains")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's)")
    p.add_argument("--out", default=None,
                   help="working directory (data, base model, runs); default runs/repro_<preset>")
    p.add_argument("--report-dir", default=None,
                   help="where REPORT.md, verdict.json and plots/ go; default <out>/report")
    p.add_argument("--jobs", type=int, default=None, help="arm runs at once (default: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="override the preset's steps per arm")
    p.add_argument("--no-kl", action="store_true", help="skip the token KL to the base (a forward per checkpoint)")
    p.add_argument("--report-only", action="store_true", help="only analyse finished runs and write the report")
    p.add_argument("--interpretation", default=None, metavar="FILE",
                   help="a Markdown file written by hand after the run, included in REPORT.md as its interpretation")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    preset = PRESETS[args.preset]
    if args.steps is not None:
        preset = dataclasses.replace(preset, steps=args.steps)
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else preset.seeds
    specs = [s for s in args.domains.split(",") if s] + list(args.domain)
    out = args.out or f"runs/repro_{preset.name}"
    report_dir = args.report_dir or os.path.join(out, "report")
    command = "rcpa-repro " + " ".join(argv if argv is not None else sys.argv[1:])
    from megatron_rcpa.repro.pipeline import reproduce

    t0 = time.perf_counter()
    verdicts = reproduce(out=out, report_dir=report_dir, preset=preset, domain_specs=specs, seeds=seeds,
                         jobs=args.jobs or preset.jobs, kl=not args.no_kl, report_only=args.report_only,
                         command=command, t0=t0,
                         interpretation=open(args.interpretation).read() if args.interpretation else None)
    for d, v in verdicts.items():
        print(f"[repro] {d}: {v['outcome']} ({v['why']})")
    print(f"[repro] report: {os.path.join(report_dir, 'REPORT.md')}")
    return 0


__all__ = ["main", "build_parser", "BUILTIN_DOMAINS", "arms_for"]

if __name__ == "__main__":
    sys.exit(main())
