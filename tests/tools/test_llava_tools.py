"""What only the LLaVA tool run checks (the shared round trip is in test_family_tools.py): the gate's table
lists the tower tensors LLaVA does not read (SigLIP's pooling head), and the processor settings are carried
over to the export."""

from __future__ import annotations

import os

import pytest

CASE = "llava"


@pytest.mark.megatron
@pytest.mark.multiproc
def test_llava_gate_lists_unused_tower_tensors_and_export_keeps_the_processor(tool_runs):
    trip = tool_runs.round_trip(CASE)
    assert trip.verify[0] == 0, trip.verify[1] + trip.verify[2]
    assert "vision_tower.head.probe" in trip.verify[1]
    assert trip.export[0] == 0 and os.path.exists(os.path.join(trip.back, "preprocessor_config.json"))
