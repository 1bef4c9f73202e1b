"""init_replicated_by_name: the trainer's rule for replicated towers (moved from train/trainer.py), pinned."""

from __future__ import annotations

import zlib

import torch

from megatron_rcpa.runtime.weights import init_replicated_by_name


class _Tower(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)
        self.post_norm = torch.nn.LayerNorm(3)


def _expected(name: str, shape, seed: int, std: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62))
    full = torch.randn(shape, generator=gen, dtype=torch.float32) * std
    return full + 1.0 if "norm" in name and name.endswith("weight") else full


def test_each_tensor_is_drawn_from_its_name():
    a, b = _Tower(), _Tower()
    init_replicated_by_name(a, seed=5, std=0.02)
    init_replicated_by_name(b, seed=5, std=0.02)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, _expected(name, p.shape, 5, 0.02)), name
        assert torch.equal(p, q)  # identical on every rank and layout
    assert abs(a.post_norm.weight.mean().item() - 1.0) < 0.1  # norm scales around 1
    other = _Tower()
    init_replicated_by_name(other, seed=6, std=0.02)
    assert not torch.equal(other.proj.weight, a.proj.weight)


def test_dtype_is_kept():
    tower = _Tower().to(torch.bfloat16)
    init_replicated_by_name(tower, seed=1, std=0.5)
    assert tower.proj.weight.dtype == torch.bfloat16
    assert torch.equal(tower.proj.weight, _expected("proj.weight", (3, 4), 1, 0.5).to(torch.bfloat16))
