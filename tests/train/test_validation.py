"""Validation on a held-out set (data.val_path): the baseline at step 0, per-data-source numbers, generations
written to the run dir, identical at DP=1 and DP=2 (each rank answers its share; greedy)."""

from __future__ import annotations

import json
import os

import pytest

from megatron_rcpa.testing import run_distributed

pytestmark = [pytest.mark.multiproc, pytest.mark.megatron]


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _data(tmp):
    train = [{"id": f"t{i}", "prompt": f"What is {i} + {i}?", "reference": f"\\boxed{{{2 * i}}}",
              "data_source": "arith"} for i in range(8)]
    val = [{"id": f"v{i}", "prompt": f"Add {i} and 1.", "reference": f"\\boxed{{{i + 1}}}",
            "data_source": "arith" if i % 2 else "count"} for i in range(6)]
    _write_jsonl(os.path.join(tmp, "train.jsonl"), train)
    _write_jsonl(os.path.join(tmp, "val.jsonl"), val)


def val_worker(tmp: str, out: str) -> dict:
    from megatron_rcpa.train.config import load_config
    from megatron_rcpa.train.trainer import Trainer

    cfg = load_config(None, [
        "model.family=llama", "model.tiny=true", f"data.path={tmp}/train.jsonl", f"data.val_path={tmp}/val.jsonl",
        "data.prompts_per_step=2", "rollout.max_new_tokens=4", "optim.micro_batch_size=2", "rcpa.group_size=2",
        "run.steps=2", "run.val_interval=2", "run.val_before_train=true", "run.val_generations=4",
        f"run.output_dir={out}", "run.save_interval=0", "run.progress_bar=false", "logging.tensorboard=false",
        "reward.name=math_answer"])
    Trainer(cfg).fit()
    return {}


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def test_validation_baseline_per_source_and_generations(tmp_path):
    _data(str(tmp_path))
    one, two = str(tmp_path / "dp1"), str(tmp_path / "dp2")
    run_distributed(val_worker, args=(str(tmp_path), one), world_size=1, timeout=300.0)
    recs = _records(one)
    assert sorted(recs) == [0, 1, 2]
    base = recs[0]
    assert set(base) >= {"val/reward", "val/accuracy", "val/arith/accuracy", "val/count/reward",
                         "val/response_length"}
    assert base["val/samples"] == 6 and 0.0 <= base["val/reward"] <= 1.0
    assert "val/reward" in recs[2] and "val/reward" not in recs[1]  # every run.val_interval steps
    for step in (0, 2):
        with open(os.path.join(one, "generations", f"step_{step}.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        assert len(rows) == 4 and rows[0]["id"] == "v0" and rows[0]["data_source"] == "count"
        assert set(rows[0]) == {"id", "data_source", "prompt", "response", "reference", "reward"}
    # DP=2 (global data.prompts_per_step=2: one prompt per rank): the same baseline, each rank answered half
    run_distributed(val_worker, args=(str(tmp_path), two), world_size=2, timeout=300.0)
    base2 = _records(two)[0]
    for k, v in base.items():
        if k.startswith("val/"):
            assert base2[k] == pytest.approx(v, abs=1e-9), k
