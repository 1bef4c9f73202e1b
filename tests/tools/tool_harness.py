"""The conversion command-line tools on every family, written once: a tiny HF checkpoint per family (saved by the
family's registry record), then, as a user runs them, ``convert_hf_to_megatron`` -> ``verify_conversion`` at
TP=2 (spawns its workers) -> ``convert_megatron_to_hf`` (sharded). The results are made once per session
(``conftest.py``) and read by ``test_family_tools.py`` (what every family shares) and the per-family files.

Cases (``CASES``):

* ``qwen2_5_vl``: bf16 Qwen2.5-VL (one tensor kept in fp32) saved in two safetensors files under
  transformers-5 in-memory names, converted to fp32;
* ``llava``: bf16 LLaVA, SigLIP tower + Llama;
* ``qwen2``: bf16 Qwen2ForCausalLM, tied, QKV bias.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from megatron_rcpa.testing.tools import run_tool

FP32_TENSOR = "visual.merger.ln_q.weight"  # the Qwen2.5-VL tensor kept in fp32


def _qwen_in_memory_sharded(path: str) -> None:
    """Rewrite a saved Qwen2.5-VL as two safetensors files under transformers-5 in-memory names, with one tensor
    in fp32 (not representable in bf16)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(path, "model.safetensors"))
    tensors[FP32_TENSOR] = tensors[FP32_TENSOR].float() + 1e-4

    def in_memory(name):
        if name.startswith("model."):
            return "model.language_model." + name[len("model."):]
        return "model." + name if name.startswith("visual.") else name

    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({in_memory(n): tensors[n] for n in part}, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({in_memory(n): file for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@dataclasses.dataclass(frozen=True)
class ToolCase:
    family: str
    save: Dict[str, Any]  # the family's save_tiny_hf keywords
    dtype: str  # the converted checkpoint's dtype
    convert_args: Tuple[str, ...] = ()
    shard_size: str = "100KB"
    bad_tp: int = 4
    bad_tp_error: str = ""
    verify_args: Tuple[str, ...] = ()
    prepare: Optional[Callable[[str], None]] = None  # rewrites the saved HF directory in place


CASES: Dict[str, ToolCase] = {
    "qwen2_5_vl": ToolCase("qwen2_5_vl", dict(seed=4, dtype=torch.bfloat16), "fp32", ("--dtype", "fp32"), "150KB",
                           4, "TP=4 does not divide num_key_value_heads=2", verify_args=("--atol", "1e-4"),
                           prepare=_qwen_in_memory_sharded),
    "llava": ToolCase("llava", dict(vision="siglip", text="llama", seed=4, dtype=torch.bfloat16), "bf16",
                      bad_tp=8, bad_tp_error="TP=8 does not divide"),
    "qwen2": ToolCase("qwen2", dict(seed=6, dtype=torch.bfloat16, tie_word_embeddings=True), "bf16",
                      bad_tp=4, bad_tp_error="TP=4 does not divide num_key_value_heads=2"),
}


def make_hf_dir(case: str, root: str) -> str:
    from megatron_rcpa.models import families

    spec = CASES[case]
    path = families.get(spec.family).save_tiny_hf(os.path.join(root, "hf"), **spec.save)
    if spec.prepare is not None:
        spec.prepare(path)
    return path


def read_safetensors_dir(path: str, family: str) -> Dict[str, torch.Tensor]:
    """on-disk name -> tensor over every safetensors file of a directory (in-memory names mapped back)."""
    from safetensors.torch import load_file

    from megatron_rcpa.convert.hf_io import normalize_name
    from megatron_rcpa.models import families

    aliases = families.get(family).hf_aliases
    out = {}
    for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
            for name, tensor in load_file(os.path.join(path, file)).items():
                out[normalize_name(name, aliases)] = tensor
    return out


@dataclasses.dataclass
class RoundTrip:
    hf_dir: str
    ckpt: str
    back: str
    convert: Tuple[int, str, str]
    meta: Optional[dict]
    verify: Tuple[int, str, str]
    export: Tuple[int, str, str]


def round_trip(case: str, hf_dir: str, root: str) -> RoundTrip:
    spec = CASES[case]
    ckpt, back = os.path.join(root, "megatron"), os.path.join(root, "hf_back")
    convert = run_tool("convert_hf_to_megatron.py", "--hf-dir", hf_dir, "--out", ckpt, *spec.convert_args)
    meta_path = os.path.join(ckpt, "rcpa_checkpoint.json")
    meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else None
    verify = run_tool("verify_conversion.py", "--hf-dir", hf_dir, "--megatron-dir", ckpt, "--tp", 2,
                      *spec.verify_args)
    export = run_tool("convert_megatron_to_hf.py", "--megatron-dir", ckpt, "--out", back, "--max-shard-size",
                      spec.shard_size)
    return RoundTrip(hf_dir, ckpt, back, convert, meta, verify, export)


class ToolRuns:
    """Per family, once per session on first use: the HF directory and its tool round trip."""

    def __init__(self, tmp_path_factory) -> None:
        self._tmp = tmp_path_factory
        self._dirs: Dict[str, str] = {}
        self._trips: Dict[str, RoundTrip] = {}

    def hf_dir(self, case: str) -> str:
        if case not in self._dirs:
            self._dirs[case] = make_hf_dir(case, str(self._tmp.mktemp(f"tools_{case}")))
        return self._dirs[case]

    def round_trip(self, case: str) -> RoundTrip:
        if case not in self._trips:
            self._trips[case] = round_trip(case, self.hf_dir(case), str(self._tmp.mktemp(f"trip_{case}")))
        return self._trips[case]
