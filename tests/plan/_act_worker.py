"""Worker of tests/plan/test_plan_activations.py (module level: pickled by name into spawned processes)."""

from __future__ import annotations

import torch


def saved_bytes(fn, exclude):
    """Run ``fn`` under saved_tensors_hooks; bytes of the unique storages autograd saved (``exclude``: ptrs)."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, float(sum(seen.values()))


def policy_activation_worker(hf_config_dict, mbs, seq, dtype, recompute):
    from megatron_rcpa.models.qwen2_5_vl import build_qwen2_5_vl_policy
    from megatron_rcpa.plan.recompute import recompute_overrides

    class M:
        recompute_granularity, recompute_method, recompute_num_layers = recompute

    policy = build_qwen2_5_vl_policy(hf_config_dict, params_dtype=dtype, config_overrides=recompute_overrides(M))
    policy.train()
    exclude = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    ids = torch.randint(0, 250, (mbs, seq), generator=torch.Generator().manual_seed(0))
    out, n = saved_bytes(lambda: policy(input_ids=ids), exclude)
    return n
    return n
