"""The three conversion tools end to end on every family (``tool_harness.CASES``), as a user runs them: the
family comes from config.json; HF -> megatron -> HF gives every original tensor back bit for bit and dtype
(sharded export, the tied head left out), transformers loads the export; the parity gate passes at TP=2;
a layout the model cannot hold exits 2 naming the problem and writes nothing.

Family-specific checks: test_conversion_tools.py (Qwen2.5-VL), test_llava_tools.py, test_text_lm_tools.py.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from tool_harness import CASES, read_safetensors_dir

from megatron_rcpa.testing.tools import run_tool

FAMILIES = sorted(CASES)


@pytest.mark.megatron
@pytest.mark.multiproc
@pytest.mark.parametrize("case", FAMILIES)
def test_convert_verify_export_round_trip(tool_runs, case):
    import transformers

    from megatron_rcpa.models import families

    spec, trip = CASES[case], tool_runs.round_trip(case)
    family = families.get(spec.family)
    rc, out, err = trip.convert
    assert rc == 0, err
    assert f"dtype={spec.dtype} vocab=301 (padded 384)" in out
    assert trip.meta["family"] == spec.family and trip.meta["dtype"] == spec.dtype
    assert not os.path.exists(f"{trip.ckpt}.incomplete")

    rc, out, err = trip.verify
    assert rc == 0, out + err
    assert "TP=2 PP=1" in out and "RESULT: PASS" in out and "max |" in out

    rc, out, err = trip.export
    assert rc == 0, err
    files = sorted(os.listdir(trip.back))
    assert len([f for f in files if f.endswith(".safetensors")]) > 1 and "model.safetensors.index.json" in files
    original, exported = read_safetensors_dir(trip.hf_dir, spec.family), read_safetensors_dir(trip.back, spec.family)
    assert sorted(exported) == sorted(original)
    tied = family.decoder_dims(json.loads(open(os.path.join(trip.hf_dir, "config.json")).read())).tie_word_embeddings
    assert (family.tied_head in exported) == (not tied)
    for name, tensor in original.items():  # same dtype and bits
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    model_cls = getattr(transformers, family.architectures[0])
    source = model_cls.from_pretrained(trip.hf_dir).state_dict()
    reloaded = model_cls.from_pretrained(trip.back).state_dict()
    assert source.keys() == reloaded.keys()
    assert all(torch.equal(source[k], reloaded[k]) for k in source)


@pytest.mark.parametrize("case", FAMILIES)
def test_bad_layout_exits_2_and_writes_nothing(tool_runs, case, tmp_path):
    spec = CASES[case]
    out = tmp_path / "x"
    rc, _, err = run_tool("convert_hf_to_megatron.py", "--hf-dir", tool_runs.hf_dir(case), "--out", out,
                          "--tp", spec.bad_tp)
    assert rc == 2 and spec.bad_tp_error in err
    assert not os.path.exists(out) and not os.path.exists(f"{out}.incomplete")
