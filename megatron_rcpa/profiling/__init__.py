"""Throughput / MFU profiling of RCPA steps, per phase (rollout, log-prob recompute, train, optimizer).

* :mod:`.flops` - analytic FLOP model of the policy (decoder, Qwen2.5-VL vision tower) and of each phase
* :mod:`.peaks` - dense BF16/FP8 peak TFLOP/s of H100 / H200 / B200 and card detection
* :mod:`.timer` - :class:`PhaseTimer` (CUDA events on a GPU, one synchronisation per step; peak memory)
* :mod:`.report` - per-phase records, JSON (with its schema), table and PNG
* :mod:`.precision` - BF16 / FP8 (Transformer Engine) run selection and validation
* :mod:`.runner` / :mod:`.cli` - the real steps behind ``tools/profile_throughput.py``

Importing this package imports torch, not megatron-core (the runner imports it when it runs).
"""

from .flops import DecoderShape, VisionShape, logprob_flops, rollout_flops, sequence_forward_flops, train_flops
from .peaks import PEAKS, detect_device, resolve_peak
from .precision import PrecisionError, parse_precisions
from .report import REPORT_SCHEMA, SCHEMA_VERSION, build_report, format_table, plot_report, validate_report
from .timer import PhaseTimer

__all__ = [
    "PEAKS",
    "REPORT_SCHEMA",
    "SCHEMA_VERSION",
    "DecoderShape",
    "PhaseTimer",
    "PrecisionError",
    "VisionShape",
    "build_report",
    "detect_device",
    "format_table",
    "logprob_flops",
    "parse_precisions",
    "plot_report",
    "resolve_peak",
    "rollout_flops",
    "sequence_forward_flops",
    "train_flops",
    "validate_report",
]
