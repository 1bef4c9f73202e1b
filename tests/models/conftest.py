"""The shared per-family model-test harness (``family_harness.py``), one per session: each family's tiny
models, batches, HF references and TP1 / TP2 / PP2 spawns are made once, on first use, whichever test module
asks first."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    from family_harness import Harness

    return Harness(tmp_path_factory)
