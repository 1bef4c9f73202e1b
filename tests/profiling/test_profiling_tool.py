"""tools/profile_throughput.py end to end on a CPU: the trainer's RCPA phases (KV-cache rollout, log-prob
recompute with a reference model, megatron train step and optimizer) on tiny models of every trainer family, one
process, BF16; and a proof that the profiler runs exactly the trainer's phase functions."""

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


TEXT_YAML = """
model: {family: llama, tiny: true}
data: {prompts_per_step: 2}
rollout: {max_new_tokens: 6}
optim: {micro_batch_size: 4}
rcpa: {group_size: 2, loss: {beta: 0.05}}
"""


def test_tiny_text_lm_end_to_end(tmp_path):
    stdout, report = _run_tool(tmp_path, TEXT_YAML, "--steps", "2", "--prompt-len", "12", "--prefix-len", "3",
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

    # tokens and FLOPs are the analytic model's for what ran: 4 rollouts of 12 text tokens in the family's prompt
    # format + 3 forced + 6 generated tokens. The format is the character tokenizer's chat template since issue 15
    # (ChatML: <|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n, special tokens one id each), no
    # longer "User: {prompt}\nAssistant:"
    rows, prompt, new = 4, 1 + len("user\n") + 12 + 1 + len("\n") + 1 + len("assistant\n") + 3, 6
    assert cfg["prompt_tokens"] == prompt - 3 and cfg["prefix_len"] == 3
    shape = DecoderShape(**cfg["decoder"])
    assert shape == DecoderShape(2, 64, 4, 2, 16, 128, 128, gated_mlp=True, tied_embeddings=True)
    assert phases["rollout"]["tokens"] == rows * new
    assert cfg["rollout_decode"] == "static"  # its prefill computes last-position logits only
    assert phases["rollout"]["flops"] == rollout_flops(shape, [prompt] * rows, [new] * rows, prefill_logits="last")
    lengths = [prompt + new] * rows
    assert phases["logprob"]["tokens"] == phases["train"]["tokens"] == sum(lengths)
    assert phases["logprob"]["flops"] == logprob_flops(shape, lengths, passes=2)  # policy + reference (beta > 0)
    assert phases["train"]["flops"] == train_flops(shape, lengths)
    assert phases["train"]["padded_tokens"] == rows * 40  # each row padded to a multiple of 8
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
    # ChatML: <|im_start|>user\n, 4 image tokens between vision start/end, 10 text tokens,
    # <|im_end|>\n<|im_start|>assistant\n (character tokenizer)
    assert cfg["prompt_tokens"] == 1 + 5 + (4 + 2) + 10 + 1 + 1 + 1 + 10
    (run,) = report["runs"]
    assert run["peak_tflops_per_gpu"] is None and all(p["mfu"] is None for p in run["phases"])
    phases = {p["phase"]: p for p in run["phases"]}
    decoder = DecoderShape(**cfg["decoder"])
    vision = VisionShape(**cfg["vision"])
    p = cfg["prompt_tokens"]
    rows, lengths, grids = 4, [p + 4] * 4, [(1, 4, 4)] * 4  # every rollout row carries its prompt's image
    assert phases["rollout"]["flops"] == rollout_flops(decoder, [p] * rows, [4] * rows, vision=vision, grids=grids,
                                                       prefill_logits="last")
    assert phases["logprob"]["flops"] == logprob_flops(decoder, lengths, vision=vision, grids=grids)  # beta = 0
    assert phases["train"]["flops"] == train_flops(decoder, lengths, vision=vision, grids=grids)
    assert cfg["reference_model"] is False


LLAVA_YAML = """
model: {family: llava, tiny: true}
data: {prompts_per_step: 2}
rollout: {max_new_tokens: 3}
optim: {micro_batch_size: 2}
rcpa: {group_size: 2}
"""


def test_tiny_llava_end_to_end(tmp_path):
    stdout, report = _run_tool(tmp_path, LLAVA_YAML, "--steps", "1", "--prompt-len", "8")
    cfg = report["config"]
    assert cfg["family"] == "llava" and cfg["rollouts_per_step"] == 4
    assert cfg["vision"] is None and "its FLOPs are not counted" in stdout  # said, not hidden
    phases = {p["phase"]: p for p in report["runs"][0]["phases"]}
    assert phases["rollout"]["tokens"] == 4 * 3


def test_profiler_runs_the_trainers_phase_functions(monkeypatch):
    """The profiler times megatron_rcpa.train.phases itself: every phase is called once per step, in order."""
    from megatron_rcpa.profiling.peaks import detect_device
    from megatron_rcpa.profiling.precision import parse_precisions
    from megatron_rcpa.profiling.runner import ProfileSettings, megatron_session, profile_precision
    from megatron_rcpa.train import phases
    from megatron_rcpa.train.config import load_config

    calls = []
    for name in ("rollout", "score", "advantages", "logprobs", "update"):
        real = getattr(phases, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(phases, name, spy)
    cfg = load_config(None, ["model.family=qwen2", "model.tiny=true", "data.prompts_per_step=2",
                             "rollout.max_new_tokens=2", "optim.micro_batch_size=2", "rcpa.group_size=2"])
    settings = ProfileSettings(steps=1, warmup=1, prompt_len=6)
    with megatron_session(1, 1, 0):
        record, summary = profile_precision(cfg, parse_precisions("bf16")[0], settings, detect_device(),
                                            log=lambda *a: None)
    assert calls == ["rollout", "score", "advantages", "logprobs", "update"] * 2
    assert summary["family"] == "qwen2" and record["steps"] == 1
