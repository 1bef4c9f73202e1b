"""The shipped verl parquet (with images) and TRL conversational JSONL train for two RCPA steps on the tiny
Qwen2.5-VL-style policy, read as they are (rows without a reference, over-long prompts are refused), each with a
reward written in its own ecosystem's convention (verl ``compute_score``, TRL ``f(prompts, completions, ...)``)
given by file path, which sees the rows' ``data_source`` and ``extra_info``."""

from __future__ import annotations

import json
import math
import os

import pytest

from megatron_rcpa.testing import run_distributed
from megatron_rcpa.train.config import load_config

pytestmark = [pytest.mark.multiproc, pytest.mark.megatron]

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def train_worker(out: str, data: str, extra: list) -> dict:
    from megatron_rcpa.train.trainer import Trainer

    cfg = load_config("examples/configs/tiny_cpu.yaml", [
        f"run.output_dir={out}", "run.steps=2", "run.save_interval=0", "run.progress_bar=false",
        f"data.path={data}", "data.prompts_per_step=2", "rollout.max_new_tokens=5", "optim.micro_batch_size=2",
        "rcpa.group_size=2", "logging.tensorboard=false", *extra])
    trainer = Trainer(cfg)
    history = trainer.fit()
    return {"history": history, "stats": trainer.dataset.stats.as_dict(), "rejected": dict(trainer.sampler.rejected)}


REWARDS = '''
import json
import os


def _seen(**fields):
    with open(os.environ["RCPA_REWARD_SEEN"], "a") as f:
        f.write(json.dumps(fields) + "\\n")


def compute_score(data_source, solution_str, ground_truth, extra_info=None):  # verl
    _seen(api="verl", data_source=data_source, extra_info=sorted((extra_info or {}).keys()))
    return float(str(ground_truth) in solution_str) + (0.5 if data_source.startswith("hiyouga") else 0.0)


def accuracy(prompts, completions, ground_truth, data_source, extra_info, **columns):  # TRL
    for p, d in zip(prompts, data_source):
        _seen(api="trl", data_source=d, prompt=p)
    return [float(str(g) in c) for c, g in zip(completions, ground_truth)]
'''


@pytest.mark.parametrize("name", ["verl_geometry.parquet", "trl_conversational.jsonl"])
def test_verl_and_trl_sample_files_train(tmp_path, name, monkeypatch):
    seen = tmp_path / "seen.jsonl"
    monkeypatch.setenv("RCPA_REWARD_SEEN", str(seen))  # (the spawned worker inherits it)
    (tmp_path / "rewards.py").write_text(REWARDS)
    data = str(tmp_path / name)
    with open(os.path.join(FIXTURES, name), "rb") as src, open(data, "wb") as dst:
        dst.write(src.read())
    extra = []
    if name.endswith(".jsonl"):  # + a row without a completion and one whose prompt is too long in tokens
        with open(os.path.join(FIXTURES, "triangle.png"), "rb") as src, open(tmp_path / "triangle.png", "wb") as dst:
            dst.write(src.read())
        with open(data, "a") as f:
            f.write(json.dumps({"id": "noref", "prompt": [{"role": "user", "content": "hi"}]}) + "\n")
            f.write(json.dumps({"id": "long", "prompt": [{"role": "user", "content": "z" * 200}],
                                "completion": [{"role": "assistant", "content": "ok"}]}) + "\n")
        extra = ["data.max_prompt_tokens=120"]  # char tokenizer: 200 characters > 120 tokens; < 120 * 8
    fn = "compute_score" if name.endswith(".parquet") else "accuracy"
    extra += [f"reward.name={tmp_path / 'rewards.py'}:{fn}", "reward.kwargs={}"]  # (tiny_cpu.yaml's are composite's)
    result = run_distributed(train_worker, args=(str(tmp_path / "run"), data, extra), world_size=1, timeout=300)[0]
    assert len(result["history"]) == 2
    for m in result["history"]:
        assert m["update_ok"] == 1.0 and math.isfinite(m["loss"])
    calls = [json.loads(line) for line in seen.read_text().splitlines()]
    assert calls and {c["api"] for c in calls} == {"verl" if name.endswith(".parquet") else "trl"}
    if name.endswith(".parquet"):  # verl's columns reach the reward as they are in the file
        assert {c["data_source"] for c in calls} <= {"hiyouga/geometry3k", "synthetic/similar_triangles"}
        assert all(c["extra_info"] for c in calls)  # the rows' extra_info dicts, with their keys
    else:
        assert all(isinstance(c["prompt"], str) and c["prompt"] for c in calls)
    if name.endswith(".jsonl"):
        assert result["stats"]["skipped"]["missing_reference"] == 1
        assert result["rejected"] == {"prompt_too_long": 1}
        assert result["stats"]["skipped"]["prompt_too_long"] == 1
