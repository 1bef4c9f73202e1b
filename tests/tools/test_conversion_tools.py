"""What only the Qwen2.5-VL tool run checks (the shared round trip is in test_family_tools.py): a bf16 checkpoint
in transformers-5 in-memory names with one fp32 tensor converts to fp32 and back to the original dtypes;
the gate's per-tensor table; tokenizer / processor files carried over; the gate fails against another model;
existing outputs, missing and non-checkpoint directories are refused, naming them."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tool_harness import FP32_TENSOR, read_safetensors_dir

from megatron_rcpa.testing.tools import run_tool

CASE = "qwen2_5_vl"


@pytest.mark.megatron
@pytest.mark.multiproc
def test_fp32_conversion_gate_table_assets_and_failure_modes(tool_runs, tmp_path):
    from transformers import AutoTokenizer

    trip = tool_runs.round_trip(CASE)
    hf_dir, ckpt, back = trip.hf_dir, trip.ckpt, trip.back
    assert trip.convert[0] == 0 and trip.verify[0] == 0 and trip.export[0] == 0
    assert sorted(os.listdir(ckpt)) == ["hf_assets", "model", "rcpa_checkpoint.json", "rcpa_manifest.json"]
    out = trip.verify[1]
    assert "tensors exact     = 57/57" in out
    assert "model.layers.1.self_attn.q_proj.weight" in out  # the per-tensor table
    max_delta = float(out.split("max |delta logit| = ")[1].split()[0])
    assert max_delta <= 1e-4
    for asset in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja",
                  "generation_config.json"):
        with open(os.path.join(hf_dir, asset), "rb") as a, open(os.path.join(back, asset), "rb") as b:
            assert a.read() == b.read(), asset
    assert json.loads(open(os.path.join(back, "config.json")).read())["dtype"] == "bfloat16"
    assert read_safetensors_dir(back, CASE)[FP32_TENSOR].dtype == torch.float32
    assert AutoTokenizer.from_pretrained(back).convert_tokens_to_ids("<|image_pad|>") == 299

    # the gate fails (exit 1) against a different model of the same shape
    from megatron_rcpa.models.tiny import save_tiny_qwen2_5_vl

    other = save_tiny_qwen2_5_vl(str(tmp_path / "other"), seed=5, dtype=torch.bfloat16)
    rc, out, err = run_tool("verify_conversion.py", "--hf-dir", other, "--megatron-dir", ckpt)
    assert rc == 1, out + err
    assert "RESULT: FAIL" in out and "differs" in out

    # existing outputs are refused, naming them
    rc, _, err = run_tool("convert_megatron_to_hf.py", "--megatron-dir", ckpt, "--out", back)
    assert rc == 2 and "already exists" in err


def test_missing_and_non_checkpoint_directories_exit_2(tool_runs, tmp_path):
    out = tmp_path / "never"
    rc, _, err = run_tool("convert_hf_to_megatron.py", "--hf-dir", tmp_path / "missing", "--out", out)
    assert rc == 2 and "does not exist" in err
    rc, _, err = run_tool("convert_megatron_to_hf.py", "--megatron-dir", tool_runs.hf_dir(CASE), "--out", out)
    assert rc == 2 and "not a megatron_rcpa checkpoint: rcpa_checkpoint.json not found" in err
    assert not os.path.exists(out) and not os.path.exists(f"{out}.incomplete")
