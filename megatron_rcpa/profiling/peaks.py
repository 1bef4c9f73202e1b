"""Peak dense tensor-core throughput per GPU, for MFU, and detection of the card.

Numbers are the vendors' spec-sheet values for **dense** math (the sheets print the 2:4-sparsity figures,
twice as large, with an asterisk; we halve them):

- H100 SXM5 (NVIDIA H100 Tensor Core GPU datasheet): BF16 1,979 TFLOPS* / FP8 3,958 TFLOPS* with sparsity
  -> 989.5 / 1,979 dense.
- H100 PCIe: BF16 1,513* / FP8 3,026* -> 756.5 / 1,513 dense.
- H100 NVL: BF16 1,671* / FP8 3,341* -> 835.5 / 1,670.5 dense.
- H200 SXM (NVIDIA H200 Tensor Core GPU datasheet): BF16 1,979* / FP8 3,958* -> 989.5 / 1,979 dense
  (the same GH100 compute as H100 SXM; more and faster memory).
- H200 NVL: BF16 1,671* / FP8 3,341* -> 835.5 / 1,670.5 dense.
- B200 (NVIDIA HGX B200 datasheet, per GPU = system / 8): FP8/FP6 72 PFLOPS* and FP16/BF16 36 PFLOPS* per
  8 GPUs with sparsity -> 4,500 (FP8, MXFP8 alike) / 2,250 (BF16) TFLOPS dense per GPU.

On a CPU there is no table entry: MFU is reported as null unless a peak is given (``--peak-tflops``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, Optional, Tuple

import torch

__all__ = ["PEAKS", "DeviceInfo", "GpuPeak", "detect_device", "is_blackwell", "lookup_peak", "resolve_peak"]


@dataclasses.dataclass(frozen=True)
class GpuPeak:
    name: str  # the table entry, e.g. "H100 SXM"
    bf16_tflops: float
    fp8_tflops: float
    blackwell: bool = False

    def tflops(self, precision: str) -> float:
        if precision == "bf16":
            return self.bf16_tflops
        if precision == "fp8":
            return self.fp8_tflops
        raise ValueError(f"no peak for precision {precision!r}: expected 'bf16' or 'fp8'")


#: key (what ``--gpu`` accepts) -> dense peaks. See the module docstring for the sources.
PEAKS: Dict[str, GpuPeak] = {
    "h100": GpuPeak("H100 SXM", 989.5, 1979.0),
    "h100-pcie": GpuPeak("H100 PCIe", 756.5, 1513.0),
    "h100-nvl": GpuPeak("H100 NVL", 835.5, 1670.5),
    "h200": GpuPeak("H200 SXM", 989.5, 1979.0),
    "h200-nvl": GpuPeak("H200 NVL", 835.5, 1670.5),
    "b200": GpuPeak("B200", 2250.0, 4500.0, blackwell=True),
}

# (pattern on torch.cuda.get_device_name(), table key), first match wins: the specific variants first.
_NAME_PATTERNS: Tuple[Tuple[str, str], ...] = (
    (r"H100.*PCIE", "h100-pcie"),
    (r"H100.*NVL", "h100-nvl"),
    (r"H100", "h100"),
    (r"H200.*NVL", "h200-nvl"),
    (r"H200", "h200"),  # also GH200
    (r"B200", "b200"),
)


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cuda" | "cpu"
    name: str  # torch.cuda.get_device_name(), or "cpu"
    capability: Optional[Tuple[int, int]] = None  # CUDA compute capability

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name,
                "capability": list(self.capability) if self.capability is not None else None}


def detect_device() -> DeviceInfo:
    """The current device: the current CUDA GPU if there is one, else the CPU."""
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        return DeviceInfo("cuda", torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)))
    return DeviceInfo("cpu", "cpu", None)


def lookup_peak(device_name: str) -> Optional[str]:
    """Table key for a device name (``torch.cuda.get_device_name()``), or None if not in the table."""
    upper = device_name.upper()
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, upper):
            return key
    return None


def is_blackwell(device: DeviceInfo) -> bool:
    """Blackwell (compute capability 10.x / 12.x, or a Blackwell name): the cards MXFP8 needs."""
    if device.kind != "cuda":
        return False
    if device.capability is not None and device.capability[0] >= 10:
        return True
    key = lookup_peak(device.name)
    return key is not None and PEAKS[key].blackwell


def resolve_peak(device: DeviceInfo, precision: str, *, gpu: Optional[str] = None,
                 peak_tflops: Optional[float] = None) -> Tuple[Optional[float], Optional[str]]:
    """(peak TFLOP/s per GPU for ``precision``, where it came from) for MFU.

    ``peak_tflops`` (a flag) wins, then ``gpu`` (a :data:`PEAKS` key, overriding detection), then the detected
    card. (None, None) when nothing applies (a CPU, or a card not in the table).
    """
    if peak_tflops is not None:
        if peak_tflops <= 0:
            raise ValueError(f"--peak-tflops {peak_tflops}: must be > 0")
        return float(peak_tflops), "flag --peak-tflops"
    if gpu is not None:
        if gpu not in PEAKS:
            raise ValueError(f"--gpu {gpu!r}: expected one of {', '.join(PEAKS)}")
        return PEAKS[gpu].tflops(precision), f"table: {PEAKS[gpu].name} (--gpu {gpu})"
    if device.kind != "cuda":
        return None, None
    key = lookup_peak(device.name)
    if key is None:
        return None, None
    return PEAKS[key].tflops(precision), f"table: {PEAKS[key].name} (detected {device.name!r})"
