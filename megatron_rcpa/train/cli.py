"""``rcpa-train``: run RCPA training from a YAML config plus ``key=value`` overrides.

    rcpa-train --config examples/configs/tiny_cpu.yaml run.steps=10 rcpa.loss.beta=0.01
    torchrun --nproc_per_node 8 -m megatron_rcpa.train --config my.yaml parallel.tp=8
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from megatron_rcpa.train.config import check_runnable, describe_options, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rcpa-train",
        description="Reinforced Curriculum Pre-Alignment (RCPA) training of a Megatron-Core VLM policy. "
                    "Options come from --config (YAML) and are overridden by key=value arguments; every "
                    "option and its default is listed below. Runs as one process, or under torchrun "
                    "(world size = parallel.tp x parallel.pp x data parallel).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="options (key = default  (type)):\n" + describe_options(),
    )
    p.add_argument("--config", help="YAML config file (sections: run, model, parallel, data, rollout, optim, "
                                    "reward, logging, rcpa)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. run.steps=10 rcpa.loss.beta=0.01")
    return p


def quiet_missing_extras() -> None:
    """megatron-core warns about missing Transformer Engine / apex once per module that falls back (about ten
    lines); say it once, in one line, and silence the repeats."""
    import importlib.util
    import warnings

    missing = [name for name, mod in (("Transformer Engine", "transformer_engine"), ("apex", "apex"))
               if importlib.util.find_spec(mod) is None]
    warnings.filterwarnings("ignore", message=r".*(is deprecated|is experimental).*", module=r"megatron\..*")
    warnings.filterwarnings("ignore", message=r".*(experimental|deprecated).*", category=UserWarning)
    if not missing:
        return
    for pattern in (r".*Transformer Engine and Apex are not installed.*", r".*Apex is not installed.*",
                    r".*Transformer Engine is not installed.*", r".*apex.* not installed.*"):
        warnings.filterwarnings("ignore", message=pattern)
    if os.environ.get("RANK", "0") == "0":
        print(f"[rcpa] {' and '.join(missing)} not installed: megatron-core uses its local torch implementations "
              "(fine on CPU; install them on GPUs for fused kernels and FP8)", flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if not args.print_config:
            check_runnable(cfg)  # the reward, the layout against WORLD_SIZE, images for a text family
    except (ValueError, FileNotFoundError) as e:
        print(f"rcpa-train: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    quiet_missing_extras()
    from megatron_rcpa.convert.errors import ConversionError
    from megatron_rcpa.train.guard import NonFiniteUpdateError
    from megatron_rcpa.train.trainer import run

    try:
        run(cfg)
    except NonFiniteUpdateError as e:  # a training failure with a clear cause: one line, not a traceback
        print(f"rcpa-train: error: {e}", file=sys.stderr)
        return 1
    except ConversionError as e:  # a checkpoint refused on load (unsafe metadata, corrupt files, wrong family)
        print(f"rcpa-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
