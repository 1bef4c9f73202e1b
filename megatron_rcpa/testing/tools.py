"""Running the repository's command-line tools (``tools/*.py``) as a user would, for tests."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Tuple

__all__ = ["REPO", "TOOLS", "run_tool"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(REPO, "tools")


def run_tool(name: str, *args: Any, timeout: float = 300) -> Tuple[int, str, str]:
    """Run ``tools/<name>`` with ``args`` (offline, from the repository root); (exit code, stdout, stderr)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, name), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)
    return proc.returncode, proc.stdout, proc.stderr
