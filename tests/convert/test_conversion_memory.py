"""Conversion memory is bounded by the largest tensors, not the checkpoint: neither direction builds the model.

A bf16 Qwen2 of ~210 MB with small layers (its largest tensors, the embedding and the output layer, are 16 MB
each) is converted HF -> megatron -> HF, each direction in a fresh process after a warm-up conversion of a tiny
model there (imports, megatron and gloo set-up paid). The peak resident memory of the conversion above the RSS
before it (the kernel's high-water mark ``VmHWM``, reset through ``/proc/self/clear_refs``) must stay under half
the checkpoint plus a constant: a converter that holds the model (as the converters did until they built it on
the meta device: ~1.5x the checkpoint) cannot pass, and the bound leaves room for a loaded machine's noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.megatron]

_MEASURE = r"""
import json, os, sys, warnings
warnings.filterwarnings("ignore")
from megatron_rcpa.convert.hf_to_megatron import convert_hf_to_megatron
from megatron_rcpa.convert.megatron_to_hf import convert_megatron_to_hf


def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measured(fn):
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS
        f.write("5")
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before


if __name__ == "__main__":
    direction, tiny, big, work = sys.argv[1:5]
    warm = os.path.join(work, "warm_" + direction)
    convert_hf_to_megatron(tiny, warm + "_m", in_process=True)  # imports, set-up, caches of both directions
    convert_megatron_to_hf(warm + "_m", warm + "_hf", in_process=True)
    ckpt, back = os.path.join(work, "m"), os.path.join(work, "hf_back")
    if direction == "hf_to_megatron":
        peak = measured(lambda: convert_hf_to_megatron(big, ckpt, in_process=True))
    else:
        peak = measured(lambda: convert_megatron_to_hf(ckpt, back, in_process=True, max_shard_size="50MB"))
    print("RESULT " + json.dumps(peak))
"""


def test_peak_memory_of_both_directions_is_bounded_by_the_largest_tensors(tmp_path):
    import torch
    from safetensors import safe_open

    from megatron_rcpa.models import families

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak-RSS mark")
    qwen2 = families.get("qwen2")
    tiny = qwen2.save_tiny_hf(str(tmp_path / "tiny"), seed=1, dtype=torch.bfloat16)
    big = qwen2.save_tiny_hf(str(tmp_path / "big"), seed=2, dtype=torch.bfloat16, hidden_size=512,
                             intermediate_size=1408, num_hidden_layers=32, num_attention_heads=8,
                             num_key_value_heads=2, vocab_size=16000, tie_word_embeddings=False)
    with safe_open(os.path.join(big, "model.safetensors"), framework="pt") as f:
        sizes = {n: f.get_slice(n).get_shape() for n in f.keys()}
    largest = max(torch.Size(s).numel() for s in sizes.values()) * 2
    checkpoint = os.path.getsize(os.path.join(big, "model.safetensors"))
    assert checkpoint > 200e6 and largest < 0.1 * checkpoint, (checkpoint, largest)

    result = {}
    for direction in ("hf_to_megatron", "megatron_to_hf"):  # each in a fresh process: freed heap is not reused
        out = subprocess.run([sys.executable, "-c", _MEASURE, direction, tiny, big, str(tmp_path)],
                             capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-3000:]
        result[direction] = json.loads(out.stdout.split("RESULT ", 1)[1])
    bound = 0.5 * checkpoint + 48 * 2**20
    for direction, peak in result.items():
        assert peak <= bound, (f"{direction}: peak {peak / 2**20:.0f} MB above the RSS before it, bound "
                               f"{bound / 2**20:.0f} MB (checkpoint {checkpoint / 2**20:.0f} MB, largest tensor "
                               f"{largest / 2**20:.0f} MB)")
    print({k: f"{v / 2**20:.0f} MB" for k, v in result.items()}, f"checkpoint {checkpoint / 2**20:.0f} MB")
