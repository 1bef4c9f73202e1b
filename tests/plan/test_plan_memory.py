"""The planner's weights, grads and optimizer bytes, EXACTLY, against built tiny Qwen2.5-VL policies wrapped as
the trainer wraps them (megatron DDP with fp32 grad reduction + megatron's Adam, after one real optimizer
step), at TP1, TP2 x PP2, uneven PP2 and DP2 with the distributed optimizer."""

from __future__ import annotations

import pytest
import torch

from megatron_rcpa.testing import run_distributed

TIMEOUT = 300.0


def tiny_config_dict(**kw):
    from megatron_rcpa.models.tiny import tiny_qwen2_5_vl_config

    args = dict(hidden_size=64, num_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                vocab_size=301)
    args.update(kw)
    return tiny_qwen2_5_vl_config(**args).to_dict()


def _optimizer_bytes(optimizer, bf16: bool) -> int:
    """Adam's state tensors plus (bf16) the fp32 master copies, summed over the (chained) optimizers."""
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    total = 0
    for opt in inner:
        torch_opt = opt.optimizer
        for state in torch_opt.state.values():
            for key, t in state.items():
                if key != "step" and isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        if bf16:  # the param groups hold the fp32 masters (shards with the distributed optimizer)
            for group in torch_opt.param_groups:
                for p in group["params"]:
                    assert p.dtype == torch.float32
                    total += p.numel() * p.element_size()
    return total


def memory_worker(config_dict, dtype_name, distributed_optimizer, overrides):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_rcpa.models.qwen2_5_vl import build_qwen2_5_vl_policy

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    policy = build_qwen2_5_vl_policy(config_dict, params_dtype=dtype, config_overrides=overrides)
    params = [p for p in policy.parameters()]
    numel = sum(p.numel() for p in params)
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    # exactly as megatron_rcpa.train.trainer.build_step_context wraps the policy
    model = DistributedDataParallel(policy.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer), policy)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-3, bf16=dtype_name == "bf16", params_dtype=dtype,
        use_distributed_optimizer=distributed_optimizer), [model])
    grad_numel = sum(p.main_grad.numel() for p in model.module.parameters())
    grad_bytes = sum(p.main_grad.numel() * p.main_grad.element_size() for p in model.module.parameters())
    buffer_bytes = sum(b.grad_data.numel() * b.grad_data.element_size() for b in model.buffers)
    model.zero_grad_buffer()
    for p in model.module.parameters():
        p.main_grad.fill_(1e-3)
    if distributed_optimizer:  # the reduce-scatter finalize_model_grads would run; the grads are equal already
        pass
    ok, _, _ = optimizer.step()
    assert ok
    return {"stage": ps.get_pipeline_model_parallel_rank(), "dp_rank": ps.get_data_parallel_rank(),
            "numel": numel, "weight_bytes": weight_bytes, "grad_numel": grad_numel, "grad_bytes": grad_bytes,
            "buffer_bytes": buffer_bytes, "optimizer_bytes": _optimizer_bytes(optimizer, dtype_name == "bf16")}


def _planned(config_dict, *, tp, pp, dp, dtype, distributed_optimizer, first=None, last=None):
    from megatron_rcpa.plan.memory import PlanInputs, plan_memory
    from megatron_rcpa.plan.shapes import model_shape

    shape = model_shape("qwen2_5_vl", config_dict)
    return plan_memory(PlanInputs(shape=shape, tp=tp, pp=pp, dp=dp, dtype=dtype,
                                  distributed_optimizer=distributed_optimizer,
                                  num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last))


LAYOUTS = [
    # (world, tp, pp, dtype, distributed optimizer, config kwargs, uneven first/last)
    pytest.param(1, 1, 1, "bf16", False, {}, None, id="tp1-bf16"),
    pytest.param(1, 1, 1, "fp32", False, {"tie_word_embeddings": True}, None, id="tp1-fp32-tied"),
    pytest.param(4, 2, 2, "bf16", False, {}, None, id="tp2pp2-bf16"),
    pytest.param(2, 1, 2, "bf16", False, {"tie_word_embeddings": True}, (1, 3), id="pp2-uneven-tied"),
    pytest.param(2, 1, 1, "bf16", True, {}, None, id="dp2-distopt-bf16"),
]


@pytest.mark.multiproc
@pytest.mark.megatron
@pytest.mark.parametrize("world,tp,pp,dtype,dist_opt,kw,uneven", LAYOUTS)
def test_weights_grads_optimizer_exact(world, tp, pp, dtype, dist_opt, kw, uneven):
    config = tiny_config_dict(**kw)
    overrides = {}
    if uneven:
        overrides = {"num_layers_in_first_pipeline_stage": uneven[0], "num_layers_in_last_pipeline_stage": uneven[1]}
    results = run_distributed(memory_worker, world_size=world, tp=tp, pp=pp, timeout=TIMEOUT,
                              args=(config, dtype, dist_opt, overrides))
    dp = world // (tp * pp)
    plan = _planned(config, tp=tp, pp=pp, dp=dp, dtype=dtype, distributed_optimizer=dist_opt,
                    first=uneven[0] if uneven else None, last=uneven[1] if uneven else None)
    for r in results:
        st = plan.stages[r["stage"]]
        assert st.params == r["numel"], (r, st)
        assert st.weights == r["weight_bytes"]
        assert st.grads == r["grad_bytes"] == 4 * r["grad_numel"]  # fp32 grad reduction
        assert r["buffer_bytes"] >= r["grad_bytes"]  # megatron may pad its bucket
        if not dist_opt:
            assert st.optimizer == r["optimizer_bytes"], (r, st)
    if dist_opt:  # the shards of one stage add up to the whole stage's states, split over DP
        for stage in range(pp):
            shards = [r["optimizer_bytes"] for r in results if r["stage"] == stage]
            assert len(shards) == dp
            assert plan.stages[stage].optimizer * dp == sum(shards)
            assert max(shards) - min(shards) <= 0.05 * sum(shards)  # an even split, up to bucket boundaries
    if tp == 1 and pp == 1:  # one rank holds the whole model
        assert plan.total_params == results[0]["numel"]


def test_stage_layer_counts():
    from megatron_rcpa.plan.memory import stage_layer_counts

    assert stage_layer_counts(80, 4) == [20, 20, 20, 20]
    assert stage_layer_counts(80, 4, first=14, last=22) == [14, 22, 22, 22]
    assert stage_layer_counts(3, 2, first=1) == [1, 2]
    assert stage_layer_counts(3, 1, first=1) == [3]
    with pytest.raises(ValueError, match="do not split evenly"):
        stage_layer_counts(80, 4, first=15)
    with pytest.raises(ValueError, match="do not fit"):
        stage_layer_counts(4, 2, first=5)
