#!/usr/bin/env python
"""Will a run fit? Per-GPU memory by pipeline stage (same as the ``rcpa-plan`` console script).

    python tools/plan_memory.py --config examples/configs/qwen2_5_vl_72b.yaml \\
        --hf-config examples/configs/hf/qwen2_5_vl_72b_config.json --nodes 4 --gpu h100-80gb [key=value ...] [--json]

See megatron_rcpa/plan/cli.py for every flag and megatron_rcpa/plan/memory.py for the memory model.
"""

import os
import sys

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rcpa.plan.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
