"""A trainer checkpoint of a ``model.tiny`` run starts another run: ``model.checkpoint=<ckpt>/policy`` builds the
same architecture with the character tokenizer (recorded in the checkpoint's metadata) and the saved weights;
``model.tiny_hidden_size`` / ``model.tiny_num_layers`` size the text families' tiny model."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_rcpa.train.config import load_config

pytestmark = [pytest.mark.multiproc, pytest.mark.megatron]


def _rows(path: str) -> None:
    with open(path, "w") as f:
        for i in range(8):
            f.write(json.dumps({"id": str(i), "prompt": f"copy {i}{i + 1} =", "reference": f"{i}{i + 1}"}) + "\n")


def _common(out: str, data: str):
    return [f"data.path={data}", "data.prompts_per_step=4", "optim.micro_batch_size=4", "rcpa.group_size=1",
            "run.mode=sft", "run.progress_bar=false", "logging.tensorboard=false", f"run.output_dir={out}",
            "run.steps=1", "model.family=llama", "optim.lr=0.01", "reward.name=token_f1"]


def _worker(tmp: str) -> dict:
    from megatron_rcpa.convert.checkpoint import read_metadata
    from megatron_rcpa.train.trainer import Trainer

    data = os.path.join(tmp, "d.jsonl")
    _rows(data)
    first = Trainer(load_config(None, _common(os.path.join(tmp, "a"), data) + [
        "model.tiny=true", "model.tiny_hidden_size=48", "model.tiny_num_layers=3"]))
    first.fit()
    policy_dir = os.path.join(tmp, "a", "checkpoints", "step_0000001", "policy")
    saved = {k: v.detach().clone() for k, v in first.model.module.state_dict().items() if torch.is_tensor(v)}
    second = Trainer(load_config(None, _common(os.path.join(tmp, "b"), data) + [f"model.checkpoint={policy_dir}"]))
    loaded = second.model.module.state_dict()
    diff = max(float((loaded[k].float() - v.float()).abs().max()) for k, v in saved.items() if v.numel())
    second.fit()  # trains and saves from there; its checkpoint keeps the tokenizer record
    again = read_metadata(os.path.join(tmp, "b", "checkpoints", "step_0000001", "policy"))
    return {"diff": diff, "layers": first.hf_config.num_hidden_layers, "hidden": first.hf_config.hidden_size,
            "second_layers": second.hf_config.num_hidden_layers, "tok": type(second.tok).__name__,
            "vocab": second.tok.vocab_size, "meta_extra": again.extra}


def test_a_tiny_trainer_checkpoint_starts_another_run(tmp_path):
    from megatron_rcpa.testing import run_distributed

    (res,) = run_distributed(_worker, world_size=1, args=(str(tmp_path),), timeout=180.0)
    assert res["diff"] == 0.0
    assert (res["layers"], res["hidden"], res["second_layers"]) == (3, 48, 3)
    assert res["tok"] == "CharTokenizer"
    assert res["meta_extra"]["char_tokenizer"] == {"extra_specials": []}
    assert res["meta_extra"]["started_from"].endswith("policy")


def test_tiny_size_options_are_checked():
    with pytest.raises(ValueError, match="tiny_hidden_size"):
        load_config(None, ["model.tiny_hidden_size=50"])
    with pytest.raises(ValueError, match="tiny_num_layers"):
        load_config(None, ["model.tiny_num_layers=0"])
    from megatron_rcpa.train.families import build_tokenizer_and_config

    with pytest.raises(ValueError, match="fixed tiny config"):
        build_tokenizer_and_config(load_config(None, ["model.tiny=true", "model.tiny_num_layers=3"]))
