"""HF exports are sharded as transformers writes them: ``max_shard_size`` (converter ``--max-shard-size``,
``run.export_max_shard_size``) with ``model.safetensors.index.json`` when there is more than one shard, and one
``model.safetensors`` without an index otherwise; transformers loads both with the original's tensors."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = [pytest.mark.multiproc, pytest.mark.megatron]


def _tensor_bytes(path: str) -> dict:
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            out[name] = t.numel() * t.element_size()
    return out


def test_export_is_sharded_with_a_correct_index_and_loads_in_transformers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_rcpa.convert.hf_to_megatron import convert_hf_to_megatron
    from megatron_rcpa.convert.megatron_to_hf import convert_megatron_to_hf
    from megatron_rcpa.models import families

    hf_dir = families.get("qwen2").save_tiny_hf(str(tmp_path / "hf"), seed=5, dtype=torch.bfloat16)
    ckpt = str(tmp_path / "megatron")
    convert_hf_to_megatron(hf_dir, ckpt, timeout=300)

    sharded, single = str(tmp_path / "sharded"), str(tmp_path / "single")
    files = convert_megatron_to_hf(ckpt, sharded, max_shard_size="50KB", timeout=300)
    assert len(files) > 2 and files == [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
                                        for i in range(len(files))]
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert sorted(set(index["weight_map"].values())) == files
    total = 0
    for file in files:
        sizes = _tensor_bytes(os.path.join(sharded, file))
        assert {n for n, f in index["weight_map"].items() if f == file} == set(sizes)
        assert sum(sizes.values()) <= 50_000 or len(sizes) == 1, (file, sizes)  # only a lone tensor may exceed it
        total += sum(sizes.values())
    assert index["metadata"]["total_size"] == total
    assert not os.path.exists(os.path.join(sharded, "model.safetensors"))

    assert convert_megatron_to_hf(ckpt, single, timeout=300) == ["model.safetensors"]  # default 5GB: one file
    assert not os.path.exists(os.path.join(single, "model.safetensors.index.json"))

    original = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).state_dict()
    for directory in (sharded, single):
        loaded = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).state_dict()
        assert sorted(loaded) == sorted(original)
        for name, tensor in original.items():
            assert loaded[name].dtype == torch.bfloat16 and torch.equal(loaded[name], tensor), name


def test_max_shard_size_is_checked():
    from megatron_rcpa.convert.errors import ConversionError
    from megatron_rcpa.convert.megatron_to_hf import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("50KB") == 50_000 and parse_size(1234) == 1234
    with pytest.raises(ConversionError, match="cannot parse size 'big'"):
        parse_size("big")
