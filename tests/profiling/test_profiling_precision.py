"""Precision / FP8 recipe validation, as functions and through the command line (exit status 2)."""

from __future__ import annotations

import pytest

from megatron_rcpa.profiling.cli import main
from megatron_rcpa.profiling.peaks import DeviceInfo
from megatron_rcpa.profiling.precision import (
    PrecisionError,
    PrecisionRun,
    check_fp8_available,
    fp8_config_overrides,
    parse_precisions,
)

H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0))
B200 = DeviceInfo("cuda", "NVIDIA B200", (10, 0))
CPU = DeviceInfo("cpu", "cpu")


def test_parse_precisions():
    assert parse_precisions() == [PrecisionRun("bf16")]
    assert parse_precisions("fp8") == [PrecisionRun("fp8", "delayed", "hybrid")]
    assert parse_precisions("fp8", "mxfp8") == [PrecisionRun("fp8", "mxfp8", "e4m3")]
    assert parse_precisions("fp8", "tensorwise", fp8_format="e4m3") == [PrecisionRun("fp8", "tensorwise", "e4m3")]
    runs = parse_precisions(compare="bf16, fp8", fp8_recipe="blockwise")
    assert [r.label for r in runs] == ["bf16", "fp8-blockwise"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(precision="fp16"), "--precision 'fp16': expected one of bf16, fp8"),
    (dict(precision="bf16", fp8_recipe="delayed"), "--fp8-recipe delayed applies to fp8 only"),
    (dict(precision="bf16", fp8_format="e4m3"), "--fp8-format e4m3 applies to fp8 only"),
    (dict(precision="fp8", fp8_recipe="nvfp4"), "--fp8-recipe 'nvfp4': expected one of delayed, tensorwise, "
                                                "blockwise, mxfp8"),
    (dict(compare="bf16"), "expected at least two"),
    (dict(compare="bf16,fp16"), "--compare 'fp16': expected one of bf16, fp8"),
    (dict(compare="bf16,bf16"), "listed twice"),
])
def test_invalid_precision_arguments(kwargs, message):
    with pytest.raises(PrecisionError, match=message.replace("(", r"\(")):
        parse_precisions(**kwargs)


def test_fp8_availability():
    check_fp8_available([PrecisionRun("bf16")], CPU)  # BF16 runs everywhere
    with pytest.raises(PrecisionError, match=r"mxfp8 needs a Blackwell GPU .* this device is NVIDIA H100 80GB "
                                             r"HBM3, compute capability 9.0"):
        check_fp8_available(parse_precisions("fp8", "mxfp8"), H100, te_error=None)
    with pytest.raises(PrecisionError, match="mxfp8 needs a Blackwell GPU .* this device is a CPU"):
        check_fp8_available(parse_precisions("fp8", "mxfp8"), CPU)
    check_fp8_available(parse_precisions("fp8", "mxfp8"), B200, te_error=None)
    check_fp8_available(parse_precisions("fp8", "delayed"), H100, te_error=None)
    with pytest.raises(PrecisionError, match="FP8 needs transformer-engine on a GPU image.*no CUDA device"):
        check_fp8_available(parse_precisions("fp8"), CPU)
    with pytest.raises(PrecisionError, match="FP8 needs transformer-engine on a GPU image.*No module named"):
        check_fp8_available(parse_precisions("fp8"), H100, te_error="'import transformer_engine.pytorch' failed "
                                                                    "(ModuleNotFoundError: No module named ...)")


def test_fp8_megatron_options():
    assert fp8_config_overrides(PrecisionRun("bf16")) == {}
    assert fp8_config_overrides(PrecisionRun("fp8", "delayed", "hybrid")) == {
        "fp8": "hybrid", "fp8_recipe": "delayed", "fp8_amax_history_len": 1024, "fp8_amax_compute_algo": "max"}
    assert fp8_config_overrides(PrecisionRun("fp8", "mxfp8", "e4m3")) == {"fp8": "e4m3", "fp8_recipe": "mxfp8"}


@pytest.mark.parametrize("flags, message", [
    (["--precision", "fp16"], "--precision 'fp16': expected one of bf16, fp8"),
    (["--fp8-recipe", "delayed"], "--fp8-recipe delayed applies to fp8 only, but the precision is bf16"),
    (["--precision", "fp8", "--fp8-recipe", "mxfp8"], "mxfp8 needs a Blackwell GPU"),
    (["--precision", "fp8"], "FP8 needs transformer-engine on a GPU image"),
    (["--compare", "bf16,fp8"], "FP8 needs transformer-engine on a GPU image"),
    (["--steps", "0"], "--steps 0: must be >= 1"),
    (["--prefix-len", "64"], "--prefix-len 64: must be >= 0 and < --prompt-len 64"),
])
def test_cli_rejects_with_exit_status_2(flags, message, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model: {family: llama, tiny: true}\n")
    assert main(["--config", str(config), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("profile_throughput.py: error: ") and message in err


def test_cli_rejects_bad_config(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model: {family: llama, tiny: true}\nrun: {stepz: 3}\n")
    assert main(["--config", str(config)]) == 2
    assert "stepz" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
