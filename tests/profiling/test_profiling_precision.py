"""Precision / FP8 backend and recipe validation, as functions and through the command line (exit status 2).

``te_error=None`` stands for "Transformer Engine imports" and a string for why it does not, so that these tests do
not depend on what this machine has installed; ``--fp8-backend auto`` resolves through it."""

from __future__ import annotations

import re

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
A100 = DeviceInfo("cuda", "NVIDIA A100-SXM4-80GB", (8, 0))
CPU = DeviceInfo("cpu", "cpu")


NO_TE = "'import transformer_engine.pytorch' failed (ModuleNotFoundError: No module named 'transformer_engine')"


def test_parse_precisions():
    assert parse_precisions() == [PrecisionRun("bf16")]
    assert parse_precisions("fp8", te_error=None) == [PrecisionRun("fp8", "delayed", "hybrid")]
    assert parse_precisions("fp8", "mxfp8", te_error=None) == [PrecisionRun("fp8", "mxfp8", "e4m3")]
    assert parse_precisions("fp8", "tensorwise", fp8_format="e4m3", te_error=None) == [
        PrecisionRun("fp8", "tensorwise", "e4m3")]
    runs = parse_precisions(compare="bf16, fp8", fp8_recipe="blockwise", te_error=None)
    assert [r.label for r in runs] == ["bf16", "fp8-blockwise"]
    assert PrecisionRun("fp8", "delayed", "hybrid").fp8_backend == "te"  # an fp8 run without a backend is TE's


def test_parse_precisions_backends():
    # auto: TE when it imports, torchao when it does not; an explicit backend is kept whatever is installed
    assert parse_precisions("fp8", te_error=None)[0].fp8_backend == "te"
    assert parse_precisions("fp8", te_error=NO_TE) == [PrecisionRun("fp8", "tensorwise", None, "torchao")]
    assert parse_precisions("fp8", fp8_backend="te", te_error=NO_TE) == [PrecisionRun("fp8", "delayed", "hybrid", "te")]
    assert parse_precisions("fp8", "rowwise", fp8_backend="torchao", te_error=None) == [
        PrecisionRun("fp8", "rowwise", None, "torchao")]
    runs = parse_precisions(compare="bf16,fp8", fp8_backend="torchao", fp8_recipe="rowwise")
    assert [r.label for r in runs] == ["bf16", "fp8-torchao-rowwise"]
    assert [(r.fp8_backend, r.fp8_recipe) for r in runs] == [(None, None), ("torchao", "rowwise")]
    runs = parse_precisions(compare="bf16,fp8", fp8_backend="te", te_error=NO_TE)
    assert [r.label for r in runs] == ["bf16", "fp8-delayed"]
    assert fp8_config_overrides(runs[1])["fp8_recipe"] == "delayed"
    assert fp8_config_overrides(PrecisionRun("fp8", "tensorwise", None, "torchao")) == {}  # not TransformerConfig's


@pytest.mark.parametrize("kwargs, message", [
    (dict(precision="fp16"), "--precision 'fp16': expected one of bf16, fp8"),
    (dict(precision="bf16", fp8_recipe="delayed"), "--fp8-recipe delayed applies to fp8 only"),
    (dict(precision="bf16", fp8_format="e4m3"), "--fp8-format e4m3 applies to fp8 only"),
    (dict(precision="fp8", fp8_recipe="nvfp4"), "--fp8-recipe 'nvfp4': expected one of delayed, tensorwise, "
                                                "blockwise, mxfp8 (te) or tensorwise, rowwise (torchao)"),
    (dict(precision="bf16", fp8_backend="torchao"), "--fp8-backend torchao applies to fp8 only"),
    (dict(precision="fp8", fp8_backend="cutlass"), "--fp8-backend 'cutlass': expected one of auto, te, torchao"),
    (dict(precision="fp8", fp8_backend="torchao", fp8_recipe="delayed"),
     "--fp8-recipe delayed: the torchao backend has the recipes tensorwise, rowwise"),
    (dict(precision="fp8", fp8_recipe="delayed", te_error=NO_TE),
     "--fp8-recipe delayed: the torchao backend (--fp8-backend auto chose torchao: transformer_engine does not "
     "import) has the recipes tensorwise, rowwise"),
    (dict(precision="fp8", fp8_backend="te", fp8_recipe="rowwise"),
     "--fp8-recipe rowwise: the te backend has the recipes delayed, tensorwise, blockwise, mxfp8"),
    (dict(precision="fp8", fp8_backend="torchao", fp8_format="e4m3"), "--fp8-format e4m3 applies to the te backend "
                                                                      "only"),
    (dict(compare="bf16"), "expected at least two"),
    (dict(compare="bf16,fp16"), "--compare 'fp16': expected one of bf16, fp8"),
    (dict(compare="bf16,bf16"), "listed twice"),
])
def test_invalid_precision_arguments(kwargs, message):
    with pytest.raises(PrecisionError, match=re.escape(message)):
        parse_precisions(**kwargs)


def test_fp8_availability():
    te = dict(fp8_backend="te")
    check_fp8_available([PrecisionRun("bf16")], CPU)  # BF16 runs everywhere
    with pytest.raises(PrecisionError, match=r"mxfp8 needs a Blackwell GPU .* this device is NVIDIA H100 80GB "
                                             r"HBM3, compute capability 9.0"):
        check_fp8_available(parse_precisions("fp8", "mxfp8", **te), H100, te_error=None)
    with pytest.raises(PrecisionError, match="mxfp8 needs a Blackwell GPU .* this device is a CPU"):
        check_fp8_available(parse_precisions("fp8", "mxfp8", **te), CPU)
    check_fp8_available(parse_precisions("fp8", "mxfp8", **te), B200, te_error=None)
    check_fp8_available(parse_precisions("fp8", "delayed", **te), H100, te_error=None)
    with pytest.raises(PrecisionError, match="FP8 needs transformer-engine on a GPU image.*no CUDA device"):
        check_fp8_available(parse_precisions("fp8", **te), CPU)
    with pytest.raises(PrecisionError, match="FP8 needs transformer-engine on a GPU image.*No module named"):
        check_fp8_available(parse_precisions("fp8", **te), H100, te_error="'import transformer_engine.pytorch' failed "
                                                                          "(ModuleNotFoundError: No module named ...)")


def test_fp8_availability_torchao():
    ao = parse_precisions(compare="bf16,fp8", fp8_backend="torchao")
    with pytest.raises(PrecisionError, match="FP8 through torchao needs a CUDA GPU with FP8 tensor cores .*this "
                                             "machine has no CUDA device: there is no FP8 matmul on a CPU"):
        check_fp8_available(ao, CPU)
    check_fp8_available(ao, H100, torchao_error=None)  # TE is not needed for torchao
    check_fp8_available(ao, H100, te_error="missing", torchao_error=None)
    with pytest.raises(PrecisionError, match=r"FP8 \(torchao\) needs compute capability 8.9\+ .*NVIDIA A100-SXM4-80GB, "
                                             r"compute capability 8.0"):
        check_fp8_available(ao, A100, torchao_error=None)
    with pytest.raises(PrecisionError, match=r"--fp8-backend torchao: 'import torchao.float8' failed .*pip install "
                                             r"torchao==0.18.0"):
        check_fp8_available(ao, H100, torchao_error="'import torchao.float8' failed (ModuleNotFoundError: ...); "
                                                    "install it with pip install torchao==0.18.0")


def test_fp8_megatron_options():
    assert fp8_config_overrides(PrecisionRun("bf16")) == {}
    assert PrecisionRun("fp8", "delayed", "hybrid") == PrecisionRun("fp8", "delayed", "hybrid", "te")
    assert fp8_config_overrides(PrecisionRun("fp8", "delayed", "hybrid")) == {
        "fp8": "hybrid", "fp8_recipe": "delayed", "fp8_amax_history_len": 1024, "fp8_amax_compute_algo": "max"}
    assert fp8_config_overrides(PrecisionRun("fp8", "mxfp8", "e4m3")) == {"fp8": "e4m3", "fp8_recipe": "mxfp8"}


@pytest.mark.parametrize("flags, message", [
    (["--precision", "fp16"], "--precision 'fp16': expected one of bf16, fp8"),
    (["--fp8-recipe", "delayed"], "--fp8-recipe delayed applies to fp8 only, but the precision is bf16"),
    (["--fp8-backend", "torchao"], "--fp8-backend torchao applies to fp8 only, but the precision is bf16"),
    (["--precision", "fp8", "--fp8-backend", "te", "--fp8-recipe", "mxfp8"], "mxfp8 needs a Blackwell GPU"),
    (["--precision", "fp8", "--fp8-backend", "te"], "FP8 needs transformer-engine on a GPU image"),
    (["--compare", "bf16,fp8", "--fp8-backend", "te"], "FP8 needs transformer-engine on a GPU image"),
    # no TE here: auto is torchao, which needs a GPU too
    (["--precision", "fp8"], "FP8 through torchao needs a CUDA GPU with FP8 tensor cores"),
    (["--compare", "bf16,fp8"], "there is no FP8 matmul on a CPU"),
    (["--compare", "bf16,fp8", "--fp8-backend", "torchao", "--fp8-recipe", "rowwise"],
     "FP8 through torchao needs a CUDA GPU"),
    (["--compare", "bf16,fp8", "--fp8-backend", "torchao", "--fp8-recipe", "delayed"],
     "--fp8-recipe delayed: the torchao backend has the recipes tensorwise, rowwise"),
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
