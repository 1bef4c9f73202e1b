"""tools/profile_throughput.py end to end on a CPU: real RCPA steps (KV-cache rollout, log-prob recompute with a
reference model, megatron train step and optimizer) on tiny models, one process, BF16."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_rcpa.profiling.flops import DecoderShape, VisionShape, logprob_flops, rollout_flops, train_flops
from megatron_rcpa.profiling.report import validate_report

pytestmark = [pytest.mark.megatron]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "profile_throughput.py")
PHASES = ["rollout", "logprob", "train", "optimizer"]


def _run_tool(tmp_path, yaml_text, *flags):
    config = tmp_path / "run.yaml"
    config.write_text(yaml_text)
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, TOOL, "--config", str(config), "--out-dir", str(tmp_path / "out"), *flags],
                          capture_output=True, text=True, timeout=180, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(tmp_path / "out" / "profile_throughput.json") as f:
        report = json.load(f)
    validate_report(report)
    with open(tmp_path / "out" / "profile_throughput.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return proc.stdout, report


GPT_YAML = """
model: {family: gpt, tiny: true}
data: {prompts_per_step: 2}
rollout: {max_new_tokens: 6}
optim: {micro_batch_size: 4}
rcpa: {group_size: 2, loss: {beta: 0.05}}
"""


def test_tiny_gpt_end_to_end(tmp_path):
    stdout, report = _run_tool(tmp_path, GPT_YAML, "--steps", "2", "--prompt-len", "12", "--prefix-len", "3",
                               "--peak-tflops", "0.5", "rollout.temperature=0.8")
    for column in ("phase", "time ms", "tok/s/GPU", "TFLOP/s/GPU", "MFU", "peak mem GiB"):
        assert column in stdout
    assert "wrote" in stdout and "(warm-up)" in stdout

    assert report["device"] == {"kind": "cpu", "name": "cpu", "capability": None, "world_size": 1}
    cfg = report["config"]
    assert cfg["rollouts_per_step"] == 4 and cfg["reference_model"] is True and cfg["temperature"] == 0.8
    (run,) = report["runs"]
    assert run["label"] == "bf16" and run["steps"] == 2 and run["warmup_steps"] == 1
    assert run["peak_tflops_per_gpu"] == 0.5 and run["peak_source"] == "flag --peak-tflops"
    assert [p["phase"] for p in run["phases"]] == PHASES
    phases = {p["phase"]: p for p in run["phases"]}
    for p in phases.values():
        assert len(p["times_s"]) == 2 and p["time_s"] > 0 and p["peak_memory_bytes"] is None  # CPU: no memory

    # tokens and FLOPs are the analytic model's for what ran: 4 rollouts of 12 prompt + 6 generated tokens
    rows, prompt, new = 4, 12, 6
    shape = DecoderShape(**cfg["decoder"])
    assert shape == DecoderShape(4, 64, 4, 4, 16, 128, 256, gated_mlp=False)
    assert phases["rollout"]["tokens"] == rows * new
    assert phases["rollout"]["flops"] == rollout_flops(shape, [prompt] * rows, [new] * rows)
    lengths = [prompt + new] * rows
    assert phases["logprob"]["tokens"] == phases["train"]["tokens"] == sum(lengths)
    assert phases["logprob"]["flops"] == logprob_flops(shape, lengths, passes=2)  # policy + reference (beta > 0)
    assert phases["train"]["flops"] == train_flops(shape, lengths)
    assert phases["train"]["padded_tokens"] == rows * 24  # 18 tokens padded to a multiple of 8
    assert phases["optimizer"]["flops"] is None and phases["optimizer"]["tokens"] is None
    for name in ("rollout", "logprob", "train"):
        p = phases[name]
        assert p["tflops_per_gpu"] == pytest.approx(p["flops"] / p["time_s"] / 1e12)
        assert p["mfu"] == pytest.approx(p["tflops_per_gpu"] / 0.5)
    assert run["total"]["flops"] == sum(phases[n]["flops"] for n in ("rollout", "logprob", "train"))
    # the cached decode's sampled log-probs equal the recomputed ones (bf16)
    assert run["rollout_logprob_mismatch"] < 0.05
    assert report["comparison"] == []


VL_YAML = """
model: {family: qwen2_5_vl, tiny: true}
data: {prompts_per_step: 2, image_size: 56}
rollout: {max_new_tokens: 4}
optim: {micro_batch_size: 2}
rcpa: {group_size: 2}
"""


def test_tiny_qwen2_5_vl_end_to_end(tmp_path):
    _, report = _run_tool(tmp_path, VL_YAML, "--steps", "1", "--prompt-len", "10")
    cfg = report["config"]
    assert cfg["vision"]["depth"] == 2 and cfg["image_grid"] == [1, 4, 4]
    assert cfg["prompt_tokens"] == 10 + 4 + 2  # text, 4 image tokens between vision start/end
    (run,) = report["runs"]
    assert run["peak_tflops_per_gpu"] is None and all(p["mfu"] is None for p in run["phases"])
    phases = {p["phase"]: p for p in run["phases"]}
    decoder = DecoderShape(**cfg["decoder"])
    vision = VisionShape(**cfg["vision"])
    rows, lengths, grids = 4, [16 + 4] * 4, [(1, 4, 4)] * 4  # every rollout row carries its prompt's image
    assert phases["rollout"]["flops"] == rollout_flops(decoder, [16] * rows, [4] * rows, vision=vision, grids=grids)
    assert phases["logprob"]["flops"] == logprob_flops(decoder, lengths, vision=vision, grids=grids)  # beta = 0
    assert phases["train"]["flops"] == train_flops(decoder, lengths, vision=vision, grids=grids)
    assert cfg["reference_model"] is False
