"""The shipped 72B layout fits 4 x 8 H100-80GB and H200-141GB by the planner, and the numbers quoted in the
README and in examples/rcpa_70b.sh are the planner's."""

from __future__ import annotations

import os

import pytest

from megatron_rcpa.plan.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--config", os.path.join(ROOT, "examples/configs/qwen2_5_vl_72b.yaml"), "--hf-config",
        os.path.join(ROOT, "examples/configs/hf/qwen2_5_vl_72b_config.json"), "--prefix-tokens", "512",
        "--image-tokens", "1280", "--json"]


def _plan(gpu, capsys):
    import json

    assert main([*ARGS, "--gpu", gpu]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("gpu", ["h100-80gb", "h200-141gb"])
def test_shipped_72b_layout_fits(gpu, capsys):
    plan = _plan(gpu, capsys)
    assert plan["fits"] and plan["planner_only_keys"] == []  # every setting is one rcpa-train reads
    assert plan["layout"]["tp"] == 8 and plan["layout"]["pp"] == 4


def test_quoted_numbers_are_the_planners(capsys):
    plan = _plan("h100-80gb", capsys)
    peak = f"{plan['peak_bytes'] / 2**30:.1f}"
    headroom = f"{plan['headroom_bytes'] / 2**30:.1f}"
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    with open(os.path.join(ROOT, "examples/rcpa_70b.sh"), encoding="utf-8") as f:
        script = f.read()
    assert f"**{peak}**" in readme and f"({headroom} GiB headroom)" in readme
    assert f"peak {peak} GiB per" in script and f"({headroom} GiB headroom)" in script
