"""HF directories in and out of a run (train/hf_checkpoint.py): an HF ``model.checkpoint`` is converted once
by global rank 0 (the other ranks wait on the completion marker) and reused; ``run.export_hf`` writes a
sharded HF directory of the final policy that transformers loads and whose logits match the trained policy;
``model.dtype = auto`` is the checkpoint's dtype (fp32 for the tiny model)."""

from __future__ import annotations

import json
import os

import pytest

from megatron_rcpa.testing import run_distributed
from megatron_rcpa.train.config import load_config


def _save_hf(root: str) -> str:
    import torch

    from megatron_rcpa.models import families

    return families.get("qwen2_5_vl").save_tiny_hf(os.path.join(root, "qwen_hf"), seed=3, dtype=torch.bfloat16)


def _cfg(out: str, **extra):
    overrides = [f"run.output_dir={out}", "run.steps=2", "run.save_interval=2", "run.progress_bar=false",
                 "model.family=qwen2_5_vl", "data.synthetic_size=8", "data.prompts_per_step=2",
                 "rollout.max_new_tokens=5", "optim.micro_batch_size=2", "rcpa.group_size=2",
                 "logging.tensorboard=false"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config("examples/configs/tiny_cpu.yaml", overrides)


def test_dtype_defaults_to_auto_and_export_options_are_checked(tmp_path):
    from megatron_rcpa.train.config import ModelConfig, RunConfig
    from megatron_rcpa.train.hf_checkpoint import resolve_dtype

    assert ModelConfig().dtype == "auto"
    assert resolve_dtype(ModelConfig(tiny=True)) == "fp32"
    assert resolve_dtype(ModelConfig(tiny=True, dtype="bf16")) == "bf16"
    assert RunConfig().export_hf is False and RunConfig().export_max_shard_size == "5GB"
    with pytest.raises(ValueError, match="run.export_max_shard_size"):
        RunConfig(export_max_shard_size="lots")
    with pytest.raises(ValueError, match="model.dtype"):
        ModelConfig(dtype="fp16")
    from megatron_rcpa.plan.cli import plan_dtype
    from megatron_rcpa.train.hf_checkpoint import dtype_of_hf_config

    assert dtype_of_hf_config({"text_config": {"torch_dtype": "bfloat16"}}) == "bf16"
    assert dtype_of_hf_config({"dtype": "float32"}) == dtype_of_hf_config({}) == "fp32"
    with pytest.raises(ValueError, match="stores float16"):
        dtype_of_hf_config({"torch_dtype": "float16"})
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "qwen2", "torch_dtype": "bfloat16"}')
    assert plan_dtype(ModelConfig(family="qwen2", checkpoint=str(hf)), {"torch_dtype": "bfloat16"}) == "bf16"
    assert plan_dtype(ModelConfig(family="qwen2", checkpoint=str(hf), dtype="fp32"), {}) == "fp32"


def convert_worker(hf_dir: str, out: str) -> dict:
    import torch

    from megatron_rcpa.train.hf_checkpoint import ensure_converted

    marker = os.path.join(out, "converted", "qwen_hf.json")
    first = ensure_converted(hf_dir, out, wait_timeout=300, convert_timeout=300, poll_s=0.2)
    t_first = json.load(open(marker))["time"]
    torch.distributed.barrier()
    again = ensure_converted(hf_dir, out, wait_timeout=300, convert_timeout=300, poll_s=0.2)
    t_again = json.load(open(marker))["time"]
    return {"first": first, "again": again, "reused": t_again == t_first}


@pytest.mark.multiproc
def test_hf_checkpoint_is_converted_once_by_rank_0_and_reused(tmp_path, monkeypatch):
    from megatron_rcpa.convert.checkpoint import read_metadata
    from megatron_rcpa.convert.errors import ConversionError
    from megatron_rcpa.train.hf_checkpoint import ensure_converted, prepare_checkpoints

    hf_dir = _save_hf(str(tmp_path))
    out = str(tmp_path / "run")
    ranks = run_distributed(convert_worker, args=(hf_dir, out), world_size=2, timeout=300)
    target = os.path.join(out, "converted", "qwen_hf")
    assert [r["first"] for r in ranks] == [target, target] and all(r["again"] == target for r in ranks)
    assert all(r["reused"] for r in ranks)
    meta = read_metadata(target)
    assert meta.family == "qwen2_5_vl" and meta.dtype == "bf16"  # the HF tensors' dtype, no up-cast

    # model.dtype = auto follows the checkpoint; the config points at the conversion
    cfg = prepare_checkpoints(_cfg(out, **{"model.tiny": "false", "model.checkpoint": hf_dir}))
    assert cfg.model.checkpoint == target and cfg.model.dtype == "bf16"

    # a rank other than 0 waits for the marker, and says so when it does not come
    marker = os.path.join(out, "converted", "qwen_hf.json")
    os.utime(os.path.join(hf_dir, "config.json"), ns=(1, 1))  # the source changed: the conversion is stale
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConversionError, match="waited 1 s for global rank 0 to convert .*qwen_hf"):
        ensure_converted(hf_dir, out, wait_timeout=1, poll_s=0.1)
    data = json.load(open(marker))
    import time

    from megatron_rcpa.train.hf_checkpoint import _fingerprint, _write_marker

    _write_marker(marker, {"status": "failed", "fingerprint": _fingerprint(hf_dir), "time": time.time(),
                           "error": "tensor 'x' is missing"})
    with pytest.raises(ConversionError, match="global rank 0 failed to convert .*tensor 'x' is missing"):
        ensure_converted(hf_dir, out, wait_timeout=30, poll_s=0.1)
    assert data["status"] == "done"


def train_worker(out: str, extra: dict) -> list:
    from megatron_rcpa.train.trainer import Trainer

    return Trainer(_cfg(out, **extra)).fit()


@pytest.mark.multiproc
def test_hf_dir_trains_and_exports_a_sharded_hf_dir_with_the_trained_logits(tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText

    from megatron_rcpa.convert.checkpoint import read_metadata
    from megatron_rcpa.convert.verify import verify_conversion

    hf_dir = _save_hf(str(tmp_path))
    out = str(tmp_path / "run")
    history = run_distributed(train_worker, args=(out, {"model.tiny": "false", "model.checkpoint": hf_dir,
                                                        "run.export_hf": "true",
                                                        "run.export_max_shard_size": "50KB"}),
                              world_size=1, timeout=600)[0]
    assert len(history) == 2 and all(m["update_ok"] == 1.0 for m in history)
    policy_dir = os.path.join(out, "checkpoints", "step_0000002", "policy")
    assert read_metadata(policy_dir).dtype == "bf16"  # model.dtype = auto: the HF checkpoint's bf16
    export = os.path.join(out, "hf_export")
    with open(os.path.join(export, "model.safetensors.index.json")) as f:
        index = json.load(f)
    files = sorted(f for f in os.listdir(export) if f.endswith(".safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(os.path.join(export, file), framework="pt") as f:
            names = list(f.keys())
            assert all(index["weight_map"][n] == file for n in names)
            sizes = [f.get_slice(n).get_shape() for n in names]
            nbytes = sum(2 * int(torch.tensor(s).prod()) if s else 2 for s in sizes)  # bf16
            assert nbytes <= 50_000 or len(names) == 1, (file, nbytes)
            total += nbytes
    assert index["metadata"]["total_size"] == total
    model = AutoModelForImageTextToText.from_pretrained(export, local_files_only=True)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert os.path.isfile(os.path.join(export, "tokenizer.json"))
    report = verify_conversion(export, policy_dir, timeout=300)  # the exported HF logits = the trained policy's
    assert report.passed, report.format()


def test_policy_and_reference_hf_dirs_of_one_name_convert_apart(tmp_path, monkeypatch):
    from megatron_rcpa.train import hf_checkpoint

    calls = []

    def fake(path, output_dir, *, name):
        calls.append((path, name))
        return os.path.join(output_dir, "converted", name)

    monkeypatch.setattr(hf_checkpoint, "ensure_converted", fake)
    monkeypatch.setattr(hf_checkpoint, "resolve_dtype", lambda model: "fp32")
    for sub in ("a/model", "b/model"):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "config.json").write_text("{}")
    out = str(tmp_path / "run")
    cfg = hf_checkpoint.prepare_checkpoints(_cfg(out, **{"model.tiny": "false",
                                                         "model.checkpoint": str(tmp_path / "a/model"),
                                                         "model.reference_checkpoint": str(tmp_path / "b/model")}))
    assert [n for _, n in calls] == ["model", "model-reference"]
    assert cfg.model.reference_checkpoint.endswith("model-reference")
    calls.clear()
    hf_checkpoint.prepare_checkpoints(_cfg(out, **{"model.tiny": "false", "model.checkpoint": str(tmp_path / "a/model"),
                                                   "model.reference_checkpoint": str(tmp_path / "a/model")}))
    assert [n for _, n in calls] == ["model", "model"]  # the same directory: one conversion, reused
