"""The planner's activation model against the bytes autograd really saves for backward (unique storages seen by
``torch.autograd.graph.saved_tensors_hooks``, parameters excluded) on a tiny Qwen2.5-VL policy on CPU, for
no / full / selective recompute (through the builders' ``config_overrides=`` and
:func:`megatron_rcpa.plan.recompute_overrides`), micro-batch 1 and 2, TP1 and TP2, bf16 and fp32; and for the
HF vision tower. Each within 10% (they agree to a fraction of a percent today)."""

from __future__ import annotations

import types

import pytest
import torch

from megatron_rcpa.testing import run_distributed

TIMEOUT = 300.0


def saved_bytes(fn, exclude):
    """(result of ``fn()``, bytes of the unique storages autograd saved during it, ``exclude``d pointers aside)."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, float(sum(seen.values()))


def policy_activation_worker(config_dict, mbs, seq, dtype_name, recompute):
    from megatron_rcpa.models.qwen2_5_vl import build_qwen2_5_vl_policy
    from megatron_rcpa.plan.recompute import recompute_overrides

    model_cfg = types.SimpleNamespace(recompute_granularity=recompute[0], recompute_method=recompute[1],
                                      recompute_num_layers=recompute[2])
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    policy = build_qwen2_5_vl_policy(config_dict, params_dtype=dtype, config_overrides=recompute_overrides(model_cfg))
    policy.train()
    exclude = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    ids = torch.randint(0, 250, (mbs, seq), generator=torch.Generator().manual_seed(0))
    _, n = saved_bytes(lambda: policy(input_ids=ids), exclude)
    return n


def _config(layers=3):
    from megatron_rcpa.models.tiny import tiny_qwen2_5_vl_config

    return tiny_qwen2_5_vl_config(hidden_size=64, num_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=192, vocab_size=301).to_dict()


CASES = [  # (tp, micro-batch, seq, dtype, (granularity, method, layers))
    pytest.param(1, 1, 40, "bf16", (None, None, None), id="tp1-mb1-bf16"),
    pytest.param(1, 2, 40, "bf16", (None, None, None), id="tp1-mb2-bf16"),
    pytest.param(1, 2, 40, "fp32", (None, None, None), id="tp1-mb2-fp32"),
    pytest.param(1, 2, 40, "bf16", ("full", "uniform", 1), id="tp1-mb2-full"),
    pytest.param(1, 1, 40, "bf16", ("full", "block", 2), id="tp1-mb1-full-block2"),
    pytest.param(1, 2, 40, "bf16", ("selective", None, None), id="tp1-mb2-selective"),
    pytest.param(2, 2, 40, "bf16", (None, None, None), id="tp2-mb2-bf16"),
    pytest.param(2, 1, 40, "bf16", ("full", "uniform", 1), id="tp2-mb1-full"),
]


@pytest.mark.multiproc
@pytest.mark.megatron
@pytest.mark.parametrize("tp,mbs,seq,dtype,recompute", CASES)
def test_decoder_activations_within_10_percent(tp, mbs, seq, dtype, recompute):
    from megatron_rcpa.plan.memory import PlanInputs, _stage_activations
    from megatron_rcpa.plan.shapes import model_shape

    config = _config()
    measured = run_distributed(policy_activation_worker, world_size=tp, tp=tp, timeout=TIMEOUT,
                               args=(config, mbs, seq, dtype, recompute))
    shape = model_shape("qwen2_5_vl", config)
    inp = PlanInputs(shape=shape, tp=tp, dtype=dtype, micro_batch_size=mbs, train_seq_len=seq,
                     recompute_granularity=recompute[0], recompute_method=recompute[1],
                     recompute_num_layers=recompute[2])
    planned, _ = _stage_activations(inp, shape.dims.num_layers, mbs, seq, first=True, last=True)
    for m in measured:  # every TP rank saves the same
        assert abs(planned - m) <= 0.10 * m, (planned, m)


@pytest.mark.parametrize("dtype,grid,images,recompute", [("bf16", (8, 8), 2, False), ("fp32", (8, 12), 1, False),
                                                         ("bf16", (8, 8), 2, True)])
def test_vision_tower_activations_within_10_percent(dtype, grid, images, recompute):
    from megatron_rcpa.models.qwen2_5_vl import _build_vision_tower
    from megatron_rcpa.models.tiny import tiny_qwen2_5_vl_config
    from megatron_rcpa.plan.memory import vision_activation_bytes
    from megatron_rcpa.plan.shapes import model_shape

    config = tiny_qwen2_5_vl_config(vision_depth=4, vision_hidden_size=48)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    tower = _build_vision_tower(config.vision_config, torch_dtype, "sdpa")
    if recompute:  # what model.vision_recompute plans for: HF gradient checkpointing of the blocks
        tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tower.train()
    h, w = grid
    n = images * h * w
    pixels = torch.randn(n, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0)).to(torch_dtype)
    exclude = {p.untyped_storage().data_ptr() for p in tower.parameters()}
    _, measured = saved_bytes(lambda: tower(pixels, grid_thw=torch.tensor([[1, h, w]] * images)), exclude)
    planned = vision_activation_bytes(model_shape("qwen2_5_vl", config.to_dict()), n, 1, 2 if dtype == "bf16" else 4,
                                      images=images, recompute=recompute)
    assert abs(planned - measured) <= 0.10 * measured, (planned, measured)


def test_recompute_overrides():
    from megatron_rcpa.plan.recompute import recompute_overrides
    from megatron_rcpa.train.config import ModelConfig

    assert recompute_overrides(ModelConfig()) == {}
    full = ModelConfig(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    assert recompute_overrides(full) == {"recompute_granularity": "full", "recompute_method": "uniform",
                                         "recompute_num_layers": 1}
    assert recompute_overrides(ModelConfig(recompute_granularity="selective")) == {
        "recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    with pytest.raises(ValueError, match="recompute_method"):
        ModelConfig(recompute_granularity="full")
    with pytest.raises(ValueError, match="only with model.recompute_granularity = 'full'"):
        ModelConfig(recompute_granularity="selective", recompute_num_layers=2)
    with pytest.raises(ValueError, match="recompute_granularity"):
        ModelConfig(recompute_granularity="all")
    with pytest.raises(ValueError, match="recompute_num_layers"):
        recompute_overrides(types.SimpleNamespace(recompute_granularity="full", recompute_method="uniform",
                                                  recompute_num_layers=0))
