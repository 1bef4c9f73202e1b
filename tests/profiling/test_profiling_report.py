"""Per-phase records, the JSON schema, the table and the PNG, on synthetic numbers (no model)."""

from __future__ import annotations

import copy
import json

import pytest

from megatron_rcpa.profiling.report import (
    REPORT_SCHEMA,
    SCHEMA_VERSION,
    build_report,
    build_run,
    format_table,
    phase_record,
    plot_report,
    validate_report,
    write_json,
)

DEVICE = {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "capability": [9, 0], "world_size": 2}


def _run(label, precision, scale):
    world, peak = 2, 989.5
    phases = [
        phase_record("rollout", [2.0 * scale, 3.0 * scale, 2.5 * scale], tokens=4000, flops=int(1e15),
                     world_size=world, peak_tflops=peak, peak_memory_bytes=10 * 2**30),
        phase_record("logprob", [0.5 * scale] * 3, tokens=6000, padded_tokens=6400, flops=int(2e15),
                     world_size=world, peak_tflops=peak, peak_memory_bytes=20 * 2**30),
        phase_record("train", [1.5 * scale] * 3, tokens=6000, padded_tokens=6400, flops=int(6e15),
                     world_size=world, peak_tflops=peak, peak_memory_bytes=40 * 2**30),
        phase_record("optimizer", [0.1] * 3, tokens=None, flops=None, world_size=world, peak_tflops=peak),
    ]
    return build_run(label=label, precision=precision, fp8_recipe=None if precision == "bf16" else "delayed",
                     phases=phases, step_tokens=6000, step_padded_tokens=6400, world_size=world, peak_tflops=peak,
                     peak_source="table: H100 SXM", warmup_steps=1)


def test_phase_record_arithmetic():
    rec = phase_record("train", [1.0, 3.0, 2.0], tokens=8000, flops=int(4e15), world_size=4, peak_tflops=1000.0,
                       peak_memory_bytes=5)
    assert rec["time_s"] == 2.0  # the median, not the mean of a skewed set
    assert rec["tokens_per_s_per_gpu"] == 1000.0  # 8000 tokens / 2 s / 4 GPUs
    assert rec["tflops_per_gpu"] == pytest.approx(500.0)  # 4e15 / 2 s / 4 GPUs
    assert rec["mfu"] == pytest.approx(0.5)
    no_peak = phase_record("train", [1.0], tokens=1, flops=1, world_size=1, peak_tflops=None)
    assert no_peak["mfu"] is None and no_peak["peak_memory_bytes"] is None
    with pytest.raises(ValueError, match="no measured steps"):
        phase_record("train", [], tokens=1, flops=1, world_size=1, peak_tflops=None)


def test_run_total():
    run = _run("bf16", "bf16", 1.0)
    total = run["total"]
    assert run["steps"] == 3 and [p["phase"] for p in run["phases"]] == ["rollout", "logprob", "train", "optimizer"]
    assert total["phase"] == "total"
    assert total["times_s"] == pytest.approx([4.1, 5.1, 4.6])  # per-step sums of the phases
    assert total["time_s"] == pytest.approx(4.6)
    assert total["flops"] == int(9e15) and total["peak_memory_bytes"] == 40 * 2**30
    assert total["tokens_per_s_per_gpu"] == pytest.approx(6000 / 4.6 / 2)


def test_report_schema_table_json_and_png(tmp_path):
    runs = [_run("bf16", "bf16", 1.0), _run("fp8-delayed", "fp8", 0.5)]
    report = build_report(device=DEVICE, config={"model": "qwen2_5_vl (tiny)"}, runs=runs)
    assert report["schema_version"] == SCHEMA_VERSION == REPORT_SCHEMA["properties"]["schema_version"]["enum"][0]
    speedups = {c["phase"]: c["speedup"] for c in report["comparison"]}
    assert speedups["train"] == pytest.approx(2.0) and speedups["optimizer"] == pytest.approx(1.0)
    assert set(speedups) == {"rollout", "logprob", "train", "optimizer", "total"}

    table = format_table(report)
    assert "[bf16]" in table and "[fp8-delayed]" in table and "side by side" in table
    for column in ("tok/s/GPU", "TFLOP/s/GPU", "MFU", "peak mem GiB", "speed-up fp8-delayed"):
        assert column in table
    assert "2.00x" in table  # the train speed-up
    assert "40.00" in table  # peak memory of train, GiB

    path = write_json(report, str(tmp_path / "out" / "p.json"))
    loaded = json.loads(open(path).read())
    validate_report(loaded)
    assert loaded == json.loads(json.dumps(report))

    png = plot_report(report, str(tmp_path / "out" / "p.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("device"), "report has no key 'device'"),
    (lambda r: r.update(schema_version=2), r"report.schema_version = 2 is not one of \[1\]"),
    (lambda r: r["runs"][0].update(precision="fp16"), "report.runs\\[0\\].precision = 'fp16' is not one of"),
    (lambda r: r["runs"][0]["phases"][1].update(mfu="high"), r"report.runs\[0\].phases\[1\].mfu = 'high' is not "
                                                             "of type number | null"),
    (lambda r: r["runs"][0]["total"].update(time_s=-1.0), "below the minimum"),
    (lambda r: r["runs"][0]["phases"][0].pop("tokens"), r"phases\[0\] has no key 'tokens'"),
    (lambda r: r["device"].update(world_size=True), "world_size = True is not of type integer"),
    (lambda r: r["runs"][0]["phases"][0].update(time_s=float("nan")), "is not of type number"),
])
def test_schema_violations_are_named(mutate, message):
    report = build_report(device=DEVICE, config={}, runs=[_run("bf16", "bf16", 1.0)])
    bad = copy.deepcopy(report)
    mutate(bad)
    with pytest.raises(ValueError, match=message):
        validate_report(bad)
