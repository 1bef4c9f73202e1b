#!/usr/bin/env python
"""Per-phase throughput / MFU profiler of RCPA steps, BF16 and FP8 (Transformer Engine).

    python tools/profile_throughput.py --config run.yaml --steps 5 [--precision bf16|fp8]
        [--fp8-recipe delayed|tensorwise|blockwise|mxfp8] [--compare bf16,fp8] [key=value ...]
    torchrun --nproc_per_node 8 tools/profile_throughput.py --config run.yaml --steps 10 --compare bf16,fp8

See megatron_rcpa/profiling/cli.py for every flag, megatron_rcpa/profiling/flops.py for the FLOP model and
megatron_rcpa/profiling/report.py for the JSON schema.
"""

import os
import sys

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rcpa.profiling.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
