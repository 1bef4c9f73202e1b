"""``rcpa-plan`` / ``tools/plan_memory.py``: the table, --json, planner-only keys, the 72B example config."""

from __future__ import annotations

import json
import os

import pytest

from megatron_rcpa.testing.tools import REPO, run_tool

HF72 = os.path.join(REPO, "examples", "configs", "hf", "qwen2_5_vl_72b_config.json")
HF7 = os.path.join(REPO, "examples", "configs", "hf", "qwen2_5_vl_7b_config.json")
CFG72 = os.path.join(REPO, "examples", "configs", "qwen2_5_vl_72b.yaml")
TINY = os.path.join(REPO, "examples", "configs", "tiny_cpu.yaml")


def _main_json(capsys, *argv):
    from megatron_rcpa.plan.cli import main

    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_published_architectures():
    """The shipped HF configs read as the published Qwen2.5-VL-72B / 7B-Instruct architectures."""
    from megatron_rcpa.plan.shapes import load_hf_config_json, model_shape

    for path, (hidden, layers, heads, kv, ffn, out) in ((HF72, (8192, 80, 64, 8, 29568, 8192)),
                                                         (HF7, (3584, 28, 28, 4, 18944, 3584))):
        s = model_shape("qwen2_5_vl", load_hf_config_json(path))
        d = s.dims
        assert (d.hidden_size, d.num_layers, d.num_attention_heads, d.num_kv_heads, d.ffn_hidden_size) == \
            (hidden, layers, heads, kv, ffn)
        assert d.vocab_size == s.padded_vocab_size == 152064 and not d.tie_word_embeddings
        assert d.mrope_section == (16, 24, 24)
        v = s.vision
        assert (v.depth, v.hidden_size, v.num_heads, v.ffn_hidden_size, v.out_hidden_size) == (32, 1280, 16, 3420, out)


def test_tiny_config_json_matches_the_model(capsys):
    from megatron_rcpa.plan.memory import stage_params
    from megatron_rcpa.plan.shapes import model_shape
    from megatron_rcpa.train.config import load_config
    from megatron_rcpa.train.families import build_tokenizer_and_config

    out = _main_json(capsys, "--config", TINY, "--prompt-tokens", "96")
    assert out["fits"] is True and len(out["stages"]) == 1
    cfg = load_config(TINY)
    _, hf = build_tokenizer_and_config(cfg)
    shape = model_shape("qwen2_5_vl", hf)
    params, _ = stage_params(shape, 1, 1, 0, shape.dims.num_layers)
    st = out["stages"][0]
    assert st["params"] == params == out["model"]["total_params"]
    assert st["grads"] == 4 * params
    assert st["optimizer"] == 8 * params  # fp32: Adam m and v, no master copy
    assert out["layout"]["micro_batch_size"] == cfg.optim.micro_batch_size
    assert out["layout"]["train_seq_len"] == -(-(96 + cfg.rollout.max_new_tokens) // 8) * 8


def test_72b_table_via_tool():
    code, stdout, stderr = run_tool(
        "plan_memory.py", "--config", CFG72, "--hf-config", HF72, "--nodes", "4", "--gpu", "h200-141gb",
        "--prompt-tokens", "1536", "--image-tokens", "1024", "data.path=train.jsonl", "parallel.tp=8",
        "parallel.pp=4", "parallel.distributed_optimizer=true", "model.dtype=bf16",
        "parallel.num_layers_in_first_pipeline_stage=14", "parallel.num_layers_in_last_pipeline_stage=22",
        "model.recompute_granularity=full", "model.recompute_method=uniform", "model.recompute_num_layers=1",
        "parallel.sequence_parallel=true", timeout=300)
    assert code == 0, stderr
    assert "73.4" in stdout and "TP=8 PP=4 DP=1 (32 GPUs)" in stdout
    lines = stdout.splitlines()
    layers = next(ln for ln in lines if ln.startswith("layers"))
    assert layers.split()[1:] == ["14", "22", "22", "22"]
    assert any(ln.startswith("h200-141gb (139.8 GiB): ") for ln in lines)
    assert "checkpoint on disk: model 147 GB + optimizer 881 GB = 1.03 TB per save" in stdout
    assert "not (yet) read by rcpa-train" not in stdout  # every knob the plan uses is an rcpa-train option now


def test_uneven_and_recompute_change_the_numbers(capsys):
    base = ["--config", CFG72, "--hf-config", HF72, "--nodes", "4", "--prompt-tokens", "1536", "--image-tokens",
            "256", "data.path=x.jsonl", "parallel.tp=8", "parallel.pp=4", "model.dtype=bf16",
            # the shipped config's memory settings off: plain even stages, no recompute
            "model.recompute_granularity=null", "model.recompute_method=null", "model.recompute_num_layers=null",
            "model.vision_recompute=false", "parallel.sequence_parallel=false",
            "parallel.num_layers_in_first_pipeline_stage=null"]
    plain = _main_json(capsys, *base)
    full = _main_json(capsys, *base, "model.recompute_granularity=full", "model.recompute_method=uniform",
                      "model.recompute_num_layers=1")
    uneven = _main_json(capsys, *base, "parallel.num_layers_in_first_pipeline_stage=14",
                        "parallel.num_layers_in_last_pipeline_stage=22")
    assert [s["layers"] for s in uneven["stages"]] == [14, 22, 22, 22]
    assert uneven["stages"][0]["weights"] < plain["stages"][0]["weights"]
    for a, b in zip(full["stages"], plain["stages"]):
        assert a["activations"] < b["activations"] / 5
        assert a["weights"] == b["weights"]
    assert [s["in_flight"] for s in plain["stages"]] == [4, 3, 2, 1]
    assert plain["planner_only_keys"] == [] and uneven["planner_only_keys"] == []  # all rcpa-train options now


def test_errors_name_the_problem(capsys):
    from megatron_rcpa.plan.cli import main

    assert main(["--config", CFG72, "--hf-config", HF72, "model.family=llava", "--prompt-tokens", "10"]) == 2
    assert "set model.family=qwen2_5_vl" in capsys.readouterr().err
    assert main(["--config", CFG72, "--prompt-tokens", "1536", "--image-tokens", "8"]) == 2
    assert "pass --hf-config" in capsys.readouterr().err
    assert main(["--config", CFG72, "--hf-config", HF72, "--prompt-tokens", "1536", "--image-tokens", "8",
                 "parallel.pp=3", "parallel.num_layers_in_first_pipeline_stage=null"]) == 2
    assert "do not split evenly over the 3 middle stages" in capsys.readouterr().err
    assert main(["--config", CFG72, "--hf-config", HF72, "--prompt-tokens", "1536", "--image-tokens", "8",
                 "parallel.pp=4", "parallel.num_layers_in_first_pipeline_stage=15"]) == 2
    assert "do not split evenly" in capsys.readouterr().err


@pytest.mark.parametrize("gpu", ["h100-80gb", "a100-80gb", "h200-141gb"])
def test_gpu_choices(capsys, gpu):
    out = _main_json(capsys, "--config", TINY, "--prompt-tokens", "96", "--gpu", gpu)
    from megatron_rcpa.plan.memory import GPUS

    assert out["gpu_mem_bytes"] == GPUS[gpu] and out["headroom_bytes"] == GPUS[gpu] - out["peak_bytes"]
    out = _main_json(capsys, "--config", TINY, "--prompt-tokens", "96", "--gpu-mem-gb", "0.001")
    assert out["fits"] is False


def test_auto_max_rows_sizes_the_rollout_chunk_from_the_kv_budget(capsys):
    """rollout.max_rows = auto (the default): the rank's rows in one chunk when the budget holds them, else the
    whole groups that fit rollout.kv_cache_gb; a fixed max_rows is used as given."""
    base = ["--config", TINY, "--prompt-tokens", "96"]
    auto = _main_json(capsys, *base)
    assert auto["layout"]["rollout_rows"] == 32  # 8 prompts x G=4, DP=1: all of them (0.5 x free holds far more)
    per_row = auto["stages"][0]["kv_cache"] / 32
    tight = _main_json(capsys, *base, f"rollout.kv_cache_gb={9.5 * per_row / 1e9}")  # 9 rows: 2 groups of 4
    assert tight["layout"]["rollout_rows"] == 8 and tight["stages"][0]["kv_cache"] == 8 * per_row
    fixed = _main_json(capsys, *base, "rollout.max_rows=12")
    assert fixed["layout"]["rollout_rows"] == 12
