"""megatron_rcpa.testing keeps its names for tests: they are the runtime's objects, not copies."""

from __future__ import annotations

import megatron_rcpa.runtime as runtime
import megatron_rcpa.testing as testing
from megatron_rcpa.runtime import tiny_gpt
from megatron_rcpa.testing import cpu_shim, launcher, models


def test_testing_names_are_the_runtime_objects():
    for name in testing.__all__:
        obj = getattr(testing, name)
        if name in ("tiny_gpt_model", "tiny_transformer_config"):
            assert obj is getattr(tiny_gpt, name)
        else:
            assert obj is getattr(runtime, name), name
    for module in (cpu_shim, launcher, models):
        for name in module.__all__:
            assert getattr(module, name) is getattr(testing, name)
