"""Shared plumbing of the conversion command-line tools (``tools/convert_*.py``, ``tools/verify_conversion.py``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Callable

from megatron_rcpa.convert.errors import ConversionError

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "add_layout_args", "quiet_third_party", "run_cli"]

EXIT_FAILED = 1  # the check ran and failed (verify_conversion)
EXIT_BAD_INPUT = 2  # bad input: a ConversionError, named in the message

_NOISE = (
    "Apex is not installed", "Transformer Engine and Apex are not installed", "absl.logging is not installed",
    "full scope is deprecated", "MCore's async save is deprecated", "load_common is deprecated",
    ".*torch.distributed.*deprecated", ".*TypedStorage is deprecated",
)


def quiet_third_party() -> None:
    """Silence megatron-core's environment chatter (missing apex/TE, deprecations) in tool output."""
    for message in _NOISE:
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # inherited by spawned workers
    for name in ("megatron", "megatron.core", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def add_layout_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--tp", type=int, default=1, help=f"tensor-parallel size {what} (default 1)")
    parser.add_argument("--pp", type=int, default=1, help=f"pipeline-parallel size {what} (default 1)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before the workers are killed")


def run_cli(fn: Callable[[], int]) -> int:
    """Run a tool's body; a ConversionError (bad input) prints ``error: ...`` and exits with 2."""
    quiet_third_party()
    try:
        return fn()
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - a worker's ConversionError arrives wrapped in its traceback
        text = str(exc)
        marker = "ConversionError: "
        if marker in text:
            print(f"error: {text.rsplit(marker, 1)[1].strip()}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise
