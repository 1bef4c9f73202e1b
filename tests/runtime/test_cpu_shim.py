"""The CPU shim, in this process: every test installs it and uninstalls it again (it is global state)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from megatron_rcpa.runtime import cpu_shim
from megatron_rcpa.runtime.cpu_shim import install_cpu_shim, is_cpu_shim_installed, uninstall_cpu_shim

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is a no-op where CUDA exists")


def _mode_depth() -> int:
    return torch._C._len_torch_function_stack()


@pytest.fixture
def shim():
    depth = _mode_depth()
    assert install_cpu_shim() is True
    yield
    uninstall_cpu_shim()
    assert not is_cpu_shim_installed()
    assert _mode_depth() == depth


def test_cuda_devices_become_cpu(shim):
    for device in ("cuda", "cuda:1", torch.device("cuda", 0), 0, torch.cuda.current_device()):
        assert torch.zeros(2, device=device).device.type == "cpu", device
    x = torch.arange(4.0)
    assert x.cuda().device.type == "cpu"
    assert x.to("cuda").device.type == "cpu"
    assert x.to("cuda:0", torch.float64).dtype == torch.float64
    assert x.to(device="cuda", non_blocking=True).device.type == "cpu"
    assert torch.empty(3, pin_memory=True).device.type == "cpu"
    assert x.pin_memory() is x
    assert torch.nn.Linear(2, 2).cuda().weight.device.type == "cpu"
    torch.cuda.synchronize()


def test_tensor_type_reports_cuda_names(shim):
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(1, dtype=torch.float16).type() == "torch.cuda.HalfTensor"
    assert torch.zeros(1).type("torch.cuda.DoubleTensor").dtype == torch.float64
    assert torch.zeros(1).type(torch.int64).dtype == torch.int64


def test_cuda_rng_is_the_cpu_generator(shim):
    torch.cuda.manual_seed(7)
    state = torch.cuda.get_rng_state()
    first = torch.rand(5)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(5), first)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(5), first)
    torch.cuda.set_rng_state_all(torch.cuda.get_rng_state_all())


def test_streams_and_events_are_no_ops(shim):
    stream = torch.cuda.Stream(device=torch.cuda.current_device())
    event = torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        stream.wait_stream(torch.cuda.current_stream())
        event.record()
    torch.cuda.default_stream().wait_event(event)
    assert event.query() and stream.query()
    torch.zeros(2).record_stream(torch.cuda.current_stream())


def test_uninstall_restores_torch_and_install_is_idempotent():
    originals = (torch.cuda.current_device, torch.cuda.get_rng_state, torch.cuda.Stream, torch.Tensor.type)
    depth = _mode_depth()
    assert install_cpu_shim() and install_cpu_shim()
    assert _mode_depth() == depth + 1
    uninstall_cpu_shim()
    uninstall_cpu_shim()
    assert (torch.cuda.current_device, torch.cuda.get_rng_state, torch.cuda.Stream,
            torch.Tensor.type) == originals
    assert _mode_depth() == depth
    assert torch.zeros(1).type() == "torch.FloatTensor"


def test_no_op_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    current_device = torch.cuda.current_device
    assert install_cpu_shim() is False
    assert not is_cpu_shim_installed() and torch.cuda.current_device is current_device


# ----------------------------------------------------------------------------------- with megatron-core
@pytest.mark.megatron
def test_megatron_op_with_cuda_device_runs_on_cpu(shim):
    from megatron.core.transformer.utils import get_default_causal_mask  # torch.ones(..., device="cuda")

    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu"
    assert torch.equal(mask, torch.triu(torch.ones(4, 4), diagonal=1).bool())


@pytest.mark.megatron
def test_megatron_rng_tracker_forks_the_cpu_generator(shim):
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    tracker = CudaRNGStatesTracker()
    torch.manual_seed(0)
    tracker.add("model-parallel-rng", 123)
    outside_state = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        inside_1 = torch.rand(3)
    outside = torch.rand(3)
    with tracker.fork("model-parallel-rng"):
        inside_2 = torch.rand(3)

    torch.set_rng_state(outside_state)
    assert torch.equal(outside, torch.rand(3)), "fork() did not restore the default generator"
    torch.manual_seed(123)
    assert torch.equal(inside_1, torch.rand(3)) and torch.equal(inside_2, torch.rand(3))


@pytest.mark.megatron
def test_megatron_rng_helpers_are_patched_where_imported_by_name():
    import megatron.core.tensor_parallel.random as mrandom

    original = mrandom._get_cuda_rng_state
    holder = types.ModuleType("holder_of_megatron_rng_helper")
    holder._get_cuda_rng_state = original  # as `from megatron...random import _get_cuda_rng_state` does
    sys.modules[holder.__name__] = holder
    try:
        install_cpu_shim()
        try:
            assert mrandom._get_cuda_rng_state is cpu_shim._megatron_get_cuda_rng_state
            assert holder._get_cuda_rng_state is cpu_shim._megatron_get_cuda_rng_state
            state = mrandom._get_cuda_rng_state()
            first = torch.rand(2)
            mrandom._set_cuda_rng_state(state)
            assert torch.equal(torch.rand(2), first)
        finally:
            uninstall_cpu_shim()
        assert mrandom._get_cuda_rng_state is original and holder._get_cuda_rng_state is original
    finally:
        del sys.modules[holder.__name__]
