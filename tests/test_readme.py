"""The README's two set-up commands stay in step with the code: the test command is what .ci/run executes,
and the main-job command names a config, console scripts and an output directory that exist."""

import os
import re

from megatron_rcpa.train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _block(marker: str) -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    after = text[text.index(marker):]
    return re.search(r"```bash\n(.*?)```", after, re.S).group(1)


def test_main_command_matches_the_code():
    block = _block("<!-- main-command")
    assert "pip install torch==2.13.0" in block and "pip install -e ." in block
    m = re.search(r"rcpa-train --config (\S+) && rcpa-plot (\S+)", block)
    assert m, block
    cfg = load_config(os.path.join(ROOT, m.group(1)))
    assert cfg.run.output_dir == m.group(2) and cfg.model.tiny
    setup = open(os.path.join(ROOT, "setup.py")).read()
    assert "rcpa-train=megatron_rcpa.train.cli:main" in setup and "rcpa-plot=megatron_rcpa.train.plot:main" in setup


def test_test_command_is_what_ci_runs():
    block = _block("<!-- test-command")
    assert block.splitlines()[1] == "pip install torch==2.13.0"  # torch first, alone
    assert "python -m pytest" in block
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "<!-- test-command" in ci
