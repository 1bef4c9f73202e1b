"""PhaseTimer on the CPU (perf_counter; no memory) and the peak table / card detection."""

from __future__ import annotations

import time

import pytest

from megatron_rcpa.profiling.peaks import PEAKS, DeviceInfo, is_blackwell, lookup_peak, resolve_peak
from megatron_rcpa.profiling.timer import PhaseTimer


def test_phases_accumulate_nest_and_skip_warmup():
    timer = PhaseTimer(use_cuda=False)
    for step in range(3):
        with timer.phase("a"):
            time.sleep(0.01)
            with timer.phase("inner"):
                time.sleep(0.01)
        timer.start("b")
        time.sleep(0.005)
        timer.stop("b")
        timer.start("b")  # a phase may run several times in one step: its intervals add up
        time.sleep(0.005)
        timer.stop("b")
        times = timer.end_step(record=step > 0)
        assert set(times) == {"a", "inner", "b"}
    assert len(timer.history) == 2  # the warm-up step is not kept
    assert timer.phases == ["inner", "a", "b"]  # order of first completion
    assert timer.median("a") >= timer.median("inner") >= 0.009
    assert timer.median("b") >= 0.009
    assert timer.peak_memory == {"inner": None, "a": None, "b": None}  # no CUDA: no memory figures
    assert timer.times("missing") == [0.0, 0.0]


def test_reduce_and_misuse_errors():
    timer = PhaseTimer(use_cuda=False)
    with timer.phase("x"):
        pass
    assert timer.end_step(reduce=lambda t: {k: 7.0 for k in t}) == {"x": 7.0}
    assert timer.history == [{"x": 7.0}]
    timer.start("y")
    with pytest.raises(RuntimeError, match="already running"):
        timer.start("y")
    with pytest.raises(RuntimeError, match=r"phases still running: \['y'\]"):
        timer.end_step()
    with pytest.raises(RuntimeError, match="'z' is not running"):
        timer.stop("z")
    with pytest.raises(ValueError, match="no recorded steps"):
        PhaseTimer(use_cuda=False).median("x")


@pytest.mark.parametrize("name, key", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H200", "h200"), ("NVIDIA H200 NVL", "h200-nvl"), ("NVIDIA GH200 480GB", "h200"), ("NVIDIA B200", "b200"),
    ("NVIDIA A100-SXM4-80GB", None), ("cpu", None),
])
def test_card_detection(name, key):
    assert lookup_peak(name) == key


def test_peak_resolution_and_dense_numbers():
    h100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0))
    assert resolve_peak(h100, "bf16") == (989.5, "table: H100 SXM (detected 'NVIDIA H100 80GB HBM3')")
    assert resolve_peak(h100, "fp8")[0] == 1979.0
    assert resolve_peak(h100, "bf16", gpu="b200")[0] == 2250.0  # --gpu overrides detection
    assert resolve_peak(h100, "fp8", peak_tflops=123.0) == (123.0, "flag --peak-tflops")
    cpu = DeviceInfo("cpu", "cpu")
    assert resolve_peak(cpu, "bf16") == (None, None)  # no MFU on a CPU unless a peak is given
    assert resolve_peak(cpu, "bf16", peak_tflops=1.5)[0] == 1.5
    assert resolve_peak(DeviceInfo("cuda", "NVIDIA A100", (8, 0)), "bf16") == (None, None)
    with pytest.raises(ValueError, match="--gpu 'a100': expected one of"):
        resolve_peak(h100, "bf16", gpu="a100")
    for peak in PEAKS.values():  # FP8 dense = 2 x BF16 dense on these cards (up to the sheets' rounding)
        assert peak.fp8_tflops == pytest.approx(2 * peak.bf16_tflops, rel=1e-3)


def test_blackwell_detection():
    assert is_blackwell(DeviceInfo("cuda", "NVIDIA B200", (10, 0)))
    assert is_blackwell(DeviceInfo("cuda", "some future card", (12, 0)))
    assert not is_blackwell(DeviceInfo("cuda", "NVIDIA H200", (9, 0)))
    assert not is_blackwell(DeviceInfo("cpu", "cpu"))
