"""The conversion tools' round trip per family (``tool_harness.py``), made once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tool_runs(tmp_path_factory):
    from tool_harness import ToolRuns

    return ToolRuns(tmp_path_factory)
