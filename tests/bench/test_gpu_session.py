"""bench/gpu_session.sh and bench/fetch_gpu_wheels.sh, as far as a CPU can check them: shell syntax, every file the
session references exists, --dry-run prints every item's command and writes the summary (no GPU, nothing run),
--only / --fp8 select items, and --prepare-only writes profile inputs that the profiler's own loaders accept
(the tokenizer's special tokens at the ids the Qwen2.5-VL config points at; the anchor's 2048-token rows)."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SESSION = os.path.join(ROOT, "bench", "gpu_session.sh")
FETCH = os.path.join(ROOT, "bench", "fetch_gpu_wheels.sh")
ITEMS = ["env", "prepare", "ops_pytest", "bench_rollout", "rollout_graph_checks", "profile_vl", "profile_anchor",
         "static_decode_pytest", "bench_logprob"]


def _run(args, tmp_path, timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "CARD", "RUN_FP8")}
    env["OUT"] = str(tmp_path / "out")
    return subprocess.run(["bash", SESSION, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def _summary(tmp_path):
    with open(tmp_path / "out" / "gpu_session_summary_DRYRUN.json") as f:
        return json.load(f)


@pytest.mark.parametrize("script", [SESSION, FETCH])
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_dry_run_prints_every_item_and_writes_the_summary(tmp_path):
    proc = _run(["--dry-run"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for item in ITEMS:
        assert f"[dry-run] {item} (timeout " in proc.stdout
    assert "fp8_gemm" not in proc.stdout  # optional: off by default
    summary = _summary(tmp_path)
    assert summary["dry_run"] is True and summary["not_passed"] == [] and summary["passed"] == []
    assert [i["item"] for i in summary["items"]] == ITEMS
    assert all(i["status"] == "dry_run" and i["command"] for i in summary["items"])
    # the per-item limits fit one device command (10 minutes) with the budget the script enforces
    assert summary["budget_s"] <= 540
    assert len(os.listdir(tmp_path / "out")) <= 8  # what comes back from the device: at most 8 files
    # the pip line of the device README, verbatim, runs before anything else (not in a dry run)
    with open(SESSION) as f:
        text = f.read()
    assert ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
            ".whl/*.whl && export PYTHONPATH=/tmp/site || exit;") in text


def test_every_referenced_file_exists(tmp_path):
    proc = _run(["--dry-run", "--fp8"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[dry-run] fp8_gemm (timeout " in proc.stdout
    with open(SESSION) as f:
        text = f.read() + proc.stdout
    paths = set(re.findall(r"(?<![\w/.])((?:bench|tests|tools|examples)/[\w/.-]+\.(?:py|sh|json))", text))
    assert {"bench/bench_rollout.py", "bench/bench_logprob.py", "bench/make_arch_checkpoint.py",
            "tools/profile_throughput.py", "tests/rollout/test_static_decode.py", "tests/ops/_compile_sm90.py",
            "examples/configs/hf/anchor_1_75b_config.json", "bench/fetch_gpu_wheels.sh"} <= paths
    missing = sorted(p for p in paths if not os.path.exists(os.path.join(ROOT, p)))
    assert missing == [], missing
    assert os.path.isdir(os.path.join(ROOT, "tests", "ops"))
    # the test the session deselects with -k 'not tp2' (two ranks need two GPUs) is still there by that name
    with open(os.path.join(ROOT, "tests", "rollout", "test_static_decode.py")) as f:
        assert re.search(r"def test_\w*tp2\w*\(", f.read())
    # the flags the session passes exist in the tools' parsers
    with open(os.path.join(ROOT, "megatron_rcpa", "profiling", "cli.py")) as f:
        cli = f.read()
    for flag in ("--config", "--steps", "--warmup", "--prompt-len", "--loss-impl", "--out-dir"):
        assert f'"{flag}"' in cli, flag
    for script in ("bench_rollout.py", "bench_logprob.py"):
        with open(os.path.join(ROOT, "bench", script)) as f:
            assert '"--out"' in f.read()


def test_only_selects_items_and_adds_what_they_need(tmp_path):
    proc = _run(["--dry-run", "--only", "profile_anchor,bench_rollout"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [i["item"] for i in _summary(tmp_path)["items"]] == [
        "prepare", "bench_rollout", "rollout_graph_checks", "profile_anchor"]
    bad = _run(["--dry-run", "--only", "profile_everything"], tmp_path)
    assert bad.returncode == 2 and "profile_everything" in bad.stderr
    assert _run(["--budget", "soon"], tmp_path).returncode == 2
    assert _run(["--no-such-flag"], tmp_path).returncode == 2


def test_without_wheels_or_gpu_it_refuses_clearly(tmp_path):
    """Not a dry run on this machine: no .whl/ (or no GPU) is a clear error, nothing half-runs."""
    if os.path.isdir(os.path.join(ROOT, ".whl")):
        pytest.skip(".whl/ exists here: the wheel check cannot be observed")
    proc = _run([], tmp_path)
    assert proc.returncode == 2 and "fetch_gpu_wheels.sh" in proc.stderr


def test_fetch_script_rejects_unknown_arguments():
    proc = subprocess.run(["bash", FETCH, "--bogus"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--bogus" in proc.stderr


@pytest.mark.megatron
def test_prepared_inputs_load_through_the_profilers_path(tmp_path):
    proc = subprocess.run(["bash", SESSION, "--prepare-only", str(tmp_path / "prep")], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import torch

    from megatron_rcpa.profiling.runner import ProfileSettings, synthetic_samples
    from megatron_rcpa.train.config import load_config
    from megatron_rcpa.train.families import adapter_for, build_tokenizer_and_config

    cfg = load_config(str(tmp_path / "prep" / "profile_vl.yaml"))
    tok, hf = build_tokenizer_and_config(cfg)
    assert type(hf).__name__ == "Qwen2_5_VLConfig" and hf.text_config.num_hidden_layers == 28
    family = adapter_for(cfg.model.family, tok, hf, checkpoint=cfg.model.checkpoint)
    for name, attr in (("<|image_pad|>", "image_token_id"), ("<|video_pad|>", "video_token_id"),
                       ("<|vision_start|>", "vision_start_token_id"), ("<|vision_end|>", "vision_end_token_id")):
        assert tok.token_id(name) == getattr(hf, attr), name
    gen = torch.Generator().manual_seed(0)
    (sample,) = synthetic_samples(tok, cfg, ProfileSettings(prompt_len=64), 1, 0, gen, with_images=True)
    prompt = family.format(sample)
    assert prompt.image_grid_thw.tolist() == [[1, 4, 4]]  # the last H200 profile's grid (56-pixel images)
    assert prompt.prompt_ids.count(hf.image_token_id) == 4
    assert tok.eos_token_id not in family.structural_ids()
    assert (cfg.data.prompts_per_step, cfg.rcpa.group_size, cfg.rollout.max_new_tokens, cfg.optim.micro_batch_size) == (
        8, 8, 128, 16)

    cfg = load_config(str(tmp_path / "prep" / "profile_anchor.yaml"))
    tok, hf = build_tokenizer_and_config(cfg)
    assert (type(hf).__name__, hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads,
            hf.vocab_size, hf.tie_word_embeddings) == ("Qwen2Config", 24, 2048, 16, 8, 151936, False)
    family = adapter_for(cfg.model.family, tok, hf, checkpoint=cfg.model.checkpoint)
    (sample,) = synthetic_samples(tok, cfg, ProfileSettings(prompt_len=1916), 1, 0, gen, with_images=False)
    # 1920 prompt tokens + 128 generated = the anchor's 2048-token rows, 4 per micro-batch
    assert len(family.format(sample).prompt_ids) + cfg.rollout.max_new_tokens == 2048
    assert cfg.optim.micro_batch_size == 4
    # the session passes the same --prompt-len values
    with open(SESSION) as f:
        text = f.read()
    assert "--prompt-len 64 " in text and "--prompt-len 1916 " in text


def _real_run(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("RUN_FP8",)}
    env.update(OUT=str(tmp_path / "out"), CARD="nosetup")
    proc = subprocess.run(["bash", SESSION, "--no-setup", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "out" / "gpu_session_summary_nosetup.json") as f:
        summary = json.load(f)
    return {i["item"]: i for i in summary["items"]}, summary


def test_runner_records_failures_and_skips_and_goes_on(tmp_path):
    """The real runner (not a dry run) without the device set-up: a failing item is recorded with its exit code and
    the next one still runs; an item that no longer fits the budget is skipped; the summary, the console log and the
    archive land in $OUT (at most 8 files)."""
    # both fail here: no bench_rollout JSON was written; no CUDA for the FP8 GEMMs
    items, summary = _real_run(tmp_path, "--only", "rollout_graph_checks,fp8_gemm")
    assert list(items) == ["rollout_graph_checks", "fp8_gemm"]
    for name in items:
        assert items[name]["status"] == "failed" and items[name]["exit_code"] == 1 and items[name]["seconds"] >= 0
    assert summary["not_passed"] == ["rollout_graph_checks", "fp8_gemm"] and summary["dry_run"] is False
    out = sorted(os.listdir(tmp_path / "out"))
    assert {"gpu_session_summary_nosetup.json", "gpu_session_nosetup.log", "gpu_session_nosetup.tar.gz"} <= set(out)
    assert len(out) <= 8
    with open(tmp_path / "out" / "gpu_session_nosetup.log") as f:
        log = f.read()
    assert "=== rollout_graph_checks: failed (exit 1" in log and "=== fp8_gemm: failed (exit 1" in log
    # 30 s budget - 15 s reserve < the 20 s an item needs at least: skipped, recorded, not run
    items, summary = _real_run(tmp_path, "--budget", "30", "--only", "rollout_graph_checks")
    assert items["rollout_graph_checks"]["status"] == "skipped_budget"
    assert items["rollout_graph_checks"]["exit_code"] is None and summary["budget_s"] == 30
