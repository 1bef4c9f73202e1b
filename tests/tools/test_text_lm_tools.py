"""What only the text-LM tool run checks (the shared round trip is in test_family_tools.py): a tied Qwen2 with
QKV bias exports no ``lm_head`` and keeps its biases."""

from __future__ import annotations

import pytest
from tool_harness import read_safetensors_dir

CASE = "qwen2"


@pytest.mark.megatron
@pytest.mark.multiproc
def test_tied_qwen2_exports_no_head_and_keeps_qkv_bias(tool_runs):
    trip = tool_runs.round_trip(CASE)
    assert trip.export[0] == 0, trip.export[2]
    exported = read_safetensors_dir(trip.back, CASE)
    assert "lm_head.weight" not in exported and "model.layers.0.self_attn.q_proj.bias" in exported
