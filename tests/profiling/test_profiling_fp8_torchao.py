"""``tools/profile_throughput.py --compare bf16,fp8 --fp8-backend torchao`` through the profiler's own code path
(``profiling.cli.main``) on a CPU: FP8 cannot run here, so the availability check is bypassed and torchao's
emulation (the same casts, the matmul in fp32) stands in for the FP8 GEMMs. The point is the wiring: both runs are
built and timed, the FP8 run's policy really has its decoder linears converted, and the report records the backend
and recipe. The CPU refusal itself is in test_profiling_precision.py."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("torchao")
pytestmark = [pytest.mark.multiproc, pytest.mark.megatron]

YAML = """
model: {family: llama, tiny: true}
data: {prompts_per_step: 2}
rollout: {max_new_tokens: 4}
optim: {micro_batch_size: 4}
rcpa: {group_size: 2, loss: {beta: 0.0}}
"""


def profile_worker(config: str, out_dir: str, flags: tuple) -> int:
    import megatron_rcpa.profiling.precision as precision
    from megatron_rcpa.models.fp8 import emulate_fp8_for_tests
    from megatron_rcpa.profiling.cli import main

    precision.check_fp8_available = lambda *a, **k: None  # CPU: no FP8 matmul; the emulation stands in
    with emulate_fp8_for_tests():
        return main(["--config", config, "--out-dir", out_dir, "--steps", "1", "--warmup", "0", "--prompt-len", "8",
                     *flags])


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_compare_bf16_fp8_with_the_torchao_backend(tmp_path, recipe):
    from megatron_rcpa.profiling.report import validate_report
    from megatron_rcpa.testing import run_distributed

    config = tmp_path / "run.yaml"
    config.write_text(YAML)
    out = tmp_path / "out"
    flags = ("--compare", "bf16,fp8", "--fp8-backend", "torchao", "--fp8-recipe", recipe)
    assert run_distributed(profile_worker, args=(str(config), str(out), flags), world_size=1, timeout=300) == [0]
    with open(os.path.join(out, "profile_throughput.json")) as f:
        report = json.load(f)
    validate_report(report)
    bf16, fp8 = report["runs"]
    assert (bf16["label"], bf16["precision"], bf16["fp8_backend"], bf16["fp8_recipe"]) == ("bf16", "bf16", None, None)
    assert (fp8["label"], fp8["precision"], fp8["fp8_backend"], fp8["fp8_recipe"], fp8["fp8_format"]) == (
        f"fp8-torchao-{recipe}", "fp8", "torchao", recipe, None)
    assert fp8["fp8_linears_per_rank"] == 4 * 2  # QKV, proj, fc1, fc2 of each of the 2 layers
    assert "fp8_linears_per_rank" not in bf16
    assert {c["other"] for c in report["comparison"]} == {f"fp8-torchao-{recipe}"}
    assert [p["phase"] for p in fp8["phases"]] == ["rollout", "logprob", "train", "optimizer"]
