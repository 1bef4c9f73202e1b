"""The RCPA trainer on the other policy families (built-in tiny models, synthetic data): LLaVA (CLIP + Qwen2)
at TP=2 trains, checkpoints as a ``llava`` checkpoint that converts to an HF directory passing the parity gate;
a plain Qwen2 text LM trains at TP=1; a checkpoint of another family is refused by name."""

from __future__ import annotations

import json
import math
import os

import pytest

from megatron_rcpa.testing import run_distributed
from megatron_rcpa.train.config import load_config

pytestmark = [pytest.mark.multiproc, pytest.mark.megatron]


def _cfg(out: str, family: str, **extra):
    overrides = [f"run.output_dir={out}", "run.steps=2", "run.save_interval=2", "run.progress_bar=false",
                 f"model.family={family}", "data.synthetic_size=8", "data.prompts_per_step=2",
                 "rollout.max_new_tokens=5", "optim.micro_batch_size=2", "rcpa.group_size=2",
                 "logging.tensorboard=false"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config("examples/configs/tiny_cpu.yaml", overrides)


def train_worker(out: str, family: str, extra: dict) -> list:
    from megatron_rcpa.train.trainer import Trainer

    return Trainer(_cfg(out, family, **extra)).fit()


def _check_history(history):
    assert len(history) == 2
    for m in history:
        assert m["update_ok"] == 1.0 and m["response_length"] > 0
        assert all(math.isfinite(m[k]) for k in ("loss", "grad_norm", "entropy", "logp_mismatch"))


def test_llava_trains_at_tp2_and_its_checkpoint_converts_to_hf(tmp_path):
    from megatron_rcpa.convert.megatron_to_hf import convert_megatron_to_hf
    from megatron_rcpa.convert.verify import verify_conversion

    out = str(tmp_path / "llava")
    ranks = run_distributed(train_worker, args=(out, "llava", {}), world_size=2, tp=2, timeout=300)
    _check_history(ranks[1])
    policy_dir = os.path.join(out, "checkpoints", "step_0000002", "policy")
    with open(os.path.join(policy_dir, "rcpa_checkpoint.json")) as f:
        assert json.load(f)["family"] == "llava"
    hf_dir = str(tmp_path / "hf")
    convert_megatron_to_hf(policy_dir, hf_dir, timeout=300)
    report = verify_conversion(hf_dir, policy_dir, tp=2, timeout=300)
    assert report.passed, report.format()


def test_text_lm_trains_and_a_checkpoint_of_another_family_is_refused(tmp_path):
    from megatron_rcpa.train.families import build_tokenizer_and_config

    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"id": f"s{i}", "prompt": f"What is {i} + {i + 1}?",
                                        "reference": f"\\boxed{{{2 * i + 1}}}"}) + "\n" for i in range(8)))
    out = str(tmp_path / "qwen2")
    history = run_distributed(train_worker, args=(out, "qwen2", {"data.path": str(data)}), world_size=1,
                              timeout=300)[0]
    _check_history(history)
    cfg = _cfg(out, "llava", **{"model.tiny": "false",
                                "model.checkpoint": os.path.join(out, "checkpoints", "step_0000002", "policy")})
    with pytest.raises(ValueError, match="model.family = 'llava' but .* holds a 'qwen2' model"):
        build_tokenizer_and_config(cfg)
    with pytest.raises(ValueError, match="model.family = 'gpt'.*expected one of"):  # the profiler's old tiny GPT
        _cfg(out, "gpt")


def test_llava_trains_from_a_converted_checkpoint_and_exports_like_the_original(tmp_path):
    """HF LLaVA (bf16, with tokenizer) -> megatron -> 2 RCPA steps -> HF: the exported directory has the
    original's tensor names and dtypes, its config.json and its tokenizer/processor files."""
    import torch
    from safetensors.torch import load_file

    from megatron_rcpa.convert.hf_to_megatron import convert_hf_to_megatron
    from megatron_rcpa.convert.megatron_to_hf import convert_megatron_to_hf
    from megatron_rcpa.models.tiny import save_tiny_llava

    hf_dir = save_tiny_llava(str(tmp_path / "hf"), vision="clip", text="llama", seed=2, dtype=torch.bfloat16)
    ckpt = str(tmp_path / "ckpt")
    convert_hf_to_megatron(hf_dir, ckpt, dtype="fp32", in_process=False, timeout=300)
    out = str(tmp_path / "run")
    history = run_distributed(train_worker, args=(out, "llava", {"model.tiny": "false", "model.checkpoint": ckpt}),
                              world_size=1, timeout=300)[0]
    _check_history(history)
    back = str(tmp_path / "back")
    convert_megatron_to_hf(os.path.join(out, "checkpoints", "step_0000002", "policy"), back, timeout=300)
    original, exported = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(
        os.path.join(back, "model.safetensors"))
    assert sorted(exported) == sorted(original)
    assert all(exported[n].dtype == torch.bfloat16 for n in exported)
    assert not torch.equal(exported["multi_modal_projector.linear_1.weight"],
                           original["multi_modal_projector.linear_1.weight"])  # it trained
    assert torch.equal(exported["vision_tower.post_layernorm.weight"], original["vision_tower.post_layernorm.weight"])
    for name in ("tokenizer.json", "preprocessor_config.json"):
        assert os.path.isfile(os.path.join(back, name)), name
    with open(os.path.join(back, "config.json")) as f, open(os.path.join(hf_dir, "config.json")) as g:
        assert json.load(f)["architectures"] == json.load(g)["architectures"] == ["LlavaForConditionalGeneration"]
