"""Ops tests: Triton kernels run compiled on a GPU, in the interpreter on a CPU.

TRITON_INTERPRET must be set before triton is first imported anywhere in the pytest process (megatron-core
imports it too); the root tests/conftest.py does this first, and this file repeats it so that the ops
suite also works when collected on its own.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def small_blocks(monkeypatch):
    """Force several column blocks per row so that the online-softmax rescaling and the ragged last block
    are exercised (under the interpreter a block otherwise covers a whole test row)."""
    monkeypatch.setenv("MEGATRON_RCPA_BLOCK_V", "128")
    monkeypatch.setenv("MEGATRON_RCPA_NUM_WARPS", "4")

