"""Shared plumbing of the conversion command-line tools (``tools/convert_*.py``, ``tools/verify_conversion.py``)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
import warnings
from typing import Callable, Optional, Tuple

from megatron_rcpa.convert.errors import ConversionError

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "add_layout_args", "describe_failure", "quiet_third_party", "run_cli"]

EXIT_FAILED = 1  # the check ran and failed (verify_conversion)
EXIT_BAD_INPUT = 2  # the tool could not do its job: bad input, an unreadable/unwritable file, a full disk, ...
TRACEBACK_ENV = "RCPA_TRACEBACK"  # set to 1 to get the Python traceback of a failure as well

_NOISE = (
    "Apex is not installed", "Transformer Engine and Apex are not installed", "absl.logging is not installed",
    "full scope is deprecated", "MCore's async save is deprecated", "load_common is deprecated",
    ".*torch.distributed.*deprecated", ".*TypedStorage is deprecated",
    "torch.distributed is disabled, unavailable or uninitialized", "The argument order of load has been changed",
)


def quiet_third_party() -> None:
    """Silence megatron-core's environment chatter (missing apex/TE, deprecations) in tool output."""
    for message in _NOISE:
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # inherited by spawned workers
    from megatron_rcpa.convert.manifest import UncheckedCheckpointWarning

    warnings.filterwarnings("always", category=UncheckedCheckpointWarning)  # even under PYTHONWARNINGS=ignore
    for name in ("megatron", "megatron.core", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def add_layout_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--tp", type=int, default=1, help=f"tensor-parallel size {what} (default 1)")
    parser.add_argument("--pp", type=int, default=1, help=f"pipeline-parallel size {what} (default 1)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before the workers are killed")


def _os_error_line(exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else ""
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    where = f" ({where})" if where else ""
    if exc.errno == errno.ENOSPC:
        return f"no space left on device{where or ' (while writing the output)'}"
    if exc.errno == errno.EDQUOT:
        return f"disk quota exceeded{where}"
    if isinstance(exc, PermissionError):
        return f"permission denied{where}"
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{reason}{where}"


_HEADER = re.compile(r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning)|[A-Za-z_][\w.]*Error\w*)"
                     r"(?::\s?(?P<message>.*))?$")
_ERRNO = re.compile(r"\[Errno (?P<errno>\d+)\] (?P<strerror>[^:]*)(?::\s*(?P<file>.*))?")


def _worker_failure(text: str) -> Optional[Tuple[str, str]]:
    """(exception type, one-line cause) of a failure reported as traceback text (a spawned worker's, a DCP
    exception's): its last exception header."""
    lines = text.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        m = _HEADER.match(lines[i])
        if not m or lines[i].startswith((" ", "\t")):
            continue
        etype = m.group("type").rsplit(".", 1)[-1]
        message = " ".join([m.group("message") or ""] + [ln.strip() for ln in lines[i + 1:] if ln.strip()]).strip()
        if etype in ("ConversionError", "UnsafeCheckpointError"):
            return etype, message
        num = _ERRNO.search(message)
        if num:
            file = (num.group("file") or "").strip()
            exc = OSError(int(num.group("errno")), num.group("strerror"), file.strip("'\"") or None)
            if etype == "PermissionError":
                exc = PermissionError(*exc.args[:2], exc.filename)
            return etype, _os_error_line(exc)
        if etype == "CheckpointingException":
            return etype, f"megatron checkpoint error: {message}"
        return etype, f"{etype}: {message}" if message else etype
    return None


def describe_failure(exc: BaseException) -> str:
    """One line for any failure of a tool: what went wrong and where (file, tensor, key, rank)."""
    if isinstance(exc, ConversionError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        return _os_error_line(exc)
    worker_tb = getattr(exc, "worker_traceback", None)  # a spawned worker's failure (run_distributed)
    if worker_tb:
        found = _worker_failure(worker_tb)
        if found is None:
            return " ".join(str(exc).split())
        etype, cause = found
        return cause if etype in ("ConversionError", "UnsafeCheckpointError") else f"{cause} (on rank {exc.rank})"
    for cause in _causes(exc):  # CheckpointingException / CheckpointException wrapping an OSError or our error
        if cause is not exc and isinstance(cause, (ConversionError, OSError)) and (
                not isinstance(cause, OSError) or cause.errno is not None):
            return describe_failure(cause)
    name = type(exc).__name__
    failures = getattr(exc, "failures", None)
    if name == "CheckpointException" and isinstance(failures, dict) and failures:
        rank = min(failures)
        inner = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
        if isinstance(inner, BaseException):  # torch.distributed.checkpoint: rank -> (exception, stack)
            return f"checkpoint {describe_failure(inner)} (on rank {rank})"
    text = " ".join(str(exc).split())
    if name == "CheckpointingException":
        return f"megatron checkpoint error: {text}"
    found = _worker_failure(str(exc)) if "Traceback" in str(exc) else None
    if found is not None:
        return found[1]
    return f"{name}: {text}" if text else name


def _causes(exc: BaseException):
    """``exc``, its causes/contexts and the per-rank failures of a torch ``CheckpointException``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        failures = getattr(exc, "failures", None)
        for sub in failures.values() if isinstance(failures, dict) else ():
            sub = sub[0] if isinstance(sub, tuple) and sub else sub
            if isinstance(sub, BaseException):
                yield from _causes(sub)
        exc = exc.__cause__ or exc.__context__


def run_cli(fn: Callable[[], int]) -> int:
    """Run a tool's body. Any failure prints one line, ``error: ...`` (naming the file / key / value / rank),
    and exits with 2 - never a traceback (``RCPA_TRACEBACK=1`` prints it too). ``KeyboardInterrupt`` and
    ``SystemExit`` are left alone; torch's ``CheckpointException`` (a BaseException) is a failure like any."""
    quiet_third_party()
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one line and exit code 2
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            import traceback

            traceback.print_exc()
        print(f"error: {describe_failure(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
