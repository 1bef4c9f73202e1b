"""bench/bench_fp8.py --quick on a CPU: the loss-curve comparison (BF16 vs torchao FP8, both recipes) and the
train-step timing run through torchao's emulation on a tiny model and write the JSON; without --quick a CPU is
refused (no FP8 matmul)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torchao")
pytestmark = [pytest.mark.megatron]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "bench", "bench_fp8.py")


def _run(*args, out):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OUT=str(out))
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU behaviour")
def test_quick_loss_curves_on_the_emulation(tmp_path):
    proc = _run("--quick", "--steps", "3", out=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(tmp_path / "bench_fp8_cpu.json") as f:
        res = json.load(f)
    assert res["quick"] is True and res["gemm"].startswith("skipped: no CUDA device")
    lc = res["loss_curve"]
    assert lc["emulated"] is True and sorted(lc["curves"]) == ["bf16", "fp8_rowwise", "fp8_tensorwise"]
    for name, curve in lc["curves"].items():
        assert len(curve["loss"]) == 3 and curve["ms_per_step_median"] > 0
        if name != "bf16":
            assert curve["fp8_linears"] == 8 and curve["loss"] != lc["curves"]["bf16"]["loss"]
    assert set(lc["max_rel_diff"]) == {"fp8_tensorwise", "fp8_rowwise"}
    assert lc["within_tolerance"] is (max(lc["max_rel_diff"].values()) <= lc["tolerance"])
    (step,) = res["train_step"]  # the train-step section's wiring on tiny shapes
    assert step["fp8_tensorwise_linears"] == step["fp8_rowwise_linears"] == 8
    assert all(step[f"{n}_ms"] > 0 and step[f"{n}_tflops"] > 0 for n in ("bf16", "fp8_tensorwise", "fp8_rowwise"))

    proc = _run(out=tmp_path)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
