"""SDPACoreAttention (megatron_rcpa/models/attention.py) against megatron's DotProductAttention.

* the bare function vs a plain-torch copy of megatron's arithmetic (in process, fast): causal, padding, GQA
  (native and grouped view), decode and KV-cache continuation shapes;
* the module vs ``DotProductAttention`` itself (one spawn): fp32 outputs and gradients to 1e-5, bf16 against
  an fp32 reference (SDPA no worse than megatron's own bf16 path), scale / layer scaling, dropout, refusals;
* whole policies (Qwen2.5-VL, Llama text, LLaVA) built with both specs: identical parameter names, logits
  (plain and left-padded) and parameter gradients of the masked per-token loss within 1e-5 (relative to the
  largest value when above 1) in fp32, and identical KV-cache greedy decoding, at TP1 (all families, one
  spawn), TP2 (LLaVA: sharded ViT) and PP2 (Qwen2.5-VL, through the pipeline schedule);
* the spec helpers, and the Qwen2.5-VL HF vision tower with ``attn_implementation="sdpa"`` vs "eager" on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

FP32_TOL = 1e-5
N_NEW = 4


# ------------------------------------------------------------------------------------------ references
def megatron_reference(q, k, v, mask, *, causal, scale):
    """megatron's unfused arithmetic in fp32: repeat_interleave GQA, scores, masked_fill(-10000), fp32 softmax,
    causal mask generated only when sq == sk > 1. [sq, b, np, hn] -> [sq, b, np * hn]."""
    sq, b, np_, hn = q.shape
    sk, _, ng, _ = k.shape
    q, k, v = q.float(), k.float(), v.float()
    k = k.repeat_interleave(np_ // ng, dim=2)
    v = v.repeat_interleave(np_ // ng, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) * scale
    if mask is None and causal and sq > 1:
        assert sq == sk
        mask = torch.ones(sq, sk, dtype=torch.bool).triu(1).view(1, 1, sq, sk)
    if mask is not None:
        scores = scores.masked_fill(mask, -10000.0)
    probs = scores.softmax(-1)
    return torch.einsum("bhqk,kbhd->qbhd", probs, v).reshape(sq, b, -1)


def _qkv(sq, sk, b, np_, ng, hn, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, b, np_, hn, generator=gen)
    k = torch.randn(sk, b, ng, hn, generator=gen)
    v = torch.randn(sk, b, ng, hn, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _padding_mask(sq, sk, b, pads):
    """megatron mask [b, 1, sq, sk] (True = masked): bottom-right causal | left-padded keys (``pads[i]`` per row)."""
    q_pos = torch.arange(sk - sq, sk).view(sq, 1)
    future = torch.arange(sk).view(1, sk) > q_pos
    keys = torch.ones(b, sk, dtype=torch.bool)
    for row, pad in enumerate(pads):
        keys[row, :pad] = False
    return future.view(1, 1, sq, sk) | ~keys.view(b, 1, 1, sk)


def _live_rows(mask):
    """[b, 1, sq] True where a query row sees at least one key (the rows whose output is defined)."""
    return ~mask.all(-1)


# --------------------------------------------------------------------------- the function, in process
@pytest.mark.parametrize("gqa", ["auto", "grouped"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_function_matches_megatron_arithmetic(gqa, heads):
    from megatron_rcpa.models.attention import sdpa_attention

    np_, ng = heads
    scale = 1 / math.sqrt(8)
    # causal prefill (is_causal / explicit mask), no mask (ViT), decode (sq=1) and a 3-token continuation
    for sq, sk, causal in ((7, 7, True), (7, 7, False), (1, 9, True), (1, 9, False)):
        q, k, v = _qkv(sq, sk, 3, np_, ng, 8)
        got = sdpa_attention(q, k, v, None, causal=causal, scale=scale, gqa=gqa)
        ref = megatron_reference(q, k, v, None, causal=causal and sq == sk, scale=scale)
        assert got.shape == (sq, 3, np_ * 8)
        assert (got - ref).abs().max().item() <= FP32_TOL, (sq, sk, causal)
    # continuation without a mask: bottom-right causal == megatron with the explicit bottom-right mask
    q, k, v = _qkv(3, 9, 2, np_, ng, 8)
    got = sdpa_attention(q, k, v, None, causal=True, scale=scale, gqa=gqa)
    ref = megatron_reference(q, k, v, _padding_mask(3, 9, 2, [0, 0]), causal=True, scale=scale)
    assert (got - ref).abs().max().item() <= FP32_TOL
    # padding masks, prefill and decode; left-padded query rows that see nothing are finite
    for sq, sk in ((7, 7), (1, 9), (3, 9)):
        q, k, v = _qkv(sq, sk, 3, np_, ng, 8, seed=1)
        mask = _padding_mask(sq, sk, 3, [0, 2, 5])
        got = sdpa_attention(q, k, v, mask, causal=True, scale=scale, gqa=gqa)
        ref = megatron_reference(q, k, v, mask, causal=True, scale=scale)
        live = _live_rows(mask)[:, 0].T  # [sq, b]
        assert torch.isfinite(got).all()
        assert (got - ref)[live].abs().max().item() <= FP32_TOL, (sq, sk)
    # a per-head mask [b, np, sq, sk]
    q, k, v = _qkv(5, 5, 2, np_, ng, 8, seed=2)
    mask = torch.rand(2, np_, 5, 5, generator=torch.Generator().manual_seed(3)) < 0.4
    mask[..., 0] = False
    got = sdpa_attention(q, k, v, mask, causal=True, scale=scale, gqa=gqa)
    assert (got - megatron_reference(q, k, v, mask, causal=True, scale=scale)).abs().max().item() <= FP32_TOL


def test_function_gradients_and_refusals():
    from megatron_rcpa.models.attention import sdpa_attention

    scale = 0.3
    mask = _padding_mask(6, 6, 2, [0, 2])
    inputs = _qkv(6, 6, 2, 4, 2, 8, seed=4)
    grads = []
    for fn in (lambda q, k, v: sdpa_attention(q, k, v, mask, causal=True, scale=scale),
               lambda q, k, v: sdpa_attention(q, k, v, mask, causal=True, scale=scale, gqa="grouped"),
               lambda q, k, v: megatron_reference(q, k, v, mask, causal=True, scale=scale)):
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        weight = torch.randn(6, 2, 32, generator=torch.Generator().manual_seed(5))
        weight = weight * _live_rows(mask)[:, 0].T.unsqueeze(-1)  # only rows with a defined output
        (fn(q, k, v) * weight).sum().backward()
        grads.append([q.grad, k.grad, v.grad])
    for got in grads[:2]:
        for g, r in zip(got, grads[2]):
            assert (g - r).abs().max().item() <= FP32_TOL
    q, k, v = inputs
    with pytest.raises(ValueError, match="bool"):
        sdpa_attention(q, k, v, mask.float(), causal=True, scale=scale)
    with pytest.raises(ValueError, match="does not broadcast"):
        sdpa_attention(q, k, v, mask[:, :, :3], causal=True, scale=scale)
    with pytest.raises(ValueError, match="more queries"):
        sdpa_attention(q, k[:3], v[:3], None, causal=True, scale=scale)
    with pytest.raises(ValueError, match="do not divide"):
        sdpa_attention(q, k[:, :, :1].expand(6, 2, 3, 8), v[:, :, :1].expand(6, 2, 3, 8), None, causal=True,
                       scale=scale)


def test_masked_gqa_switches_to_grouped_view_when_the_efficient_kernel_refuses(monkeypatch):
    """With a mask on CUDA, GQA goes through the grouped view where torch's efficient kernel does not take
    enable_gqa (decided by ``_grouped_for_masked_gqa``: never on CPU); both routes give megatron's result."""
    import megatron_rcpa.models.attention as attention

    q, k, v = _qkv(6, 6, 2, 4, 2, 8, seed=6)
    mask = _padding_mask(6, 6, 2, [0, 2])
    assert attention._grouped_for_masked_gqa(q, k, v, ~mask, 0.0) is False  # CPU tensors
    ref = megatron_reference(q, k, v, mask, causal=True, scale=0.3)
    live = _live_rows(mask)[:, 0].T
    calls = []

    def refuse(*args):
        calls.append(args[0].shape)
        return True

    monkeypatch.setattr(attention, "_grouped_for_masked_gqa", refuse)
    got = attention.sdpa_attention(q, k, v, mask, causal=True, scale=0.3)
    assert calls == [q.shape]
    assert (got - ref)[live].abs().max().item() <= FP32_TOL
    attention.sdpa_attention(q, k, v, None, causal=True, scale=0.3)  # no mask: flash takes GQA, no question
    attention.sdpa_attention(q, k[:, :, :1].repeat(1, 1, 2, 1), v, mask, causal=True, scale=0.3, gqa="native")
    assert len(calls) == 1


def test_specs_swap_only_the_core_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_rcpa.models.attention import (
        SDPACoreAttention,
        decoder_layer_spec,
        policy_attention_kwargs,
        vit_layer_spec,
    )

    def core(spec):
        return spec.submodules.self_attention.submodules.core_attention

    assert core(decoder_layer_spec()) is SDPACoreAttention
    assert core(decoder_layer_spec("megatron")) is DotProductAttention
    assert core(vit_layer_spec("sdpa")) is SDPACoreAttention
    assert core(vit_layer_spec("megatron")) is DotProductAttention
    assert vit_layer_spec().submodules.self_attention.params == {"attn_mask_type": AttnMaskType.no_mask}
    assert decoder_layer_spec().submodules.self_attention.params == {"attn_mask_type": AttnMaskType.causal}
    kw = policy_attention_kwargs("llava", "sdpa")
    assert sorted(kw) == ["transformer_layer_spec", "vision_layer_spec"] and kw["transformer_layer_spec"] == "sdpa"
    assert sorted(policy_attention_kwargs("qwen2_5_vl", "megatron")) == ["transformer_layer_spec"]
    with pytest.raises(ValueError, match="model.attention='flash'"):
        decoder_layer_spec("flash")
    with pytest.raises(ValueError, match="expected one of"):
        policy_attention_kwargs("llama", "te")


def test_qwen_hf_vision_tower_sdpa_matches_eager_on_cpu():
    """Our Qwen2.5-VL builder's ``vision_attn_implementation`` (default "sdpa") on CPU equals HF eager."""
    from megatron_rcpa.models.qwen2_5_vl import _build_vision_tower
    from megatron_rcpa.models.tiny import tiny_qwen2_5_vl_config

    config = tiny_qwen2_5_vl_config().vision_config
    torch.manual_seed(0)
    eager = _build_vision_tower(config, torch.float32, "eager").eval()
    sdpa = _build_vision_tower(config, torch.float32, "sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    grid = torch.tensor([[1, 4, 4], [1, 2, 6]])
    patch = 3 * config.temporal_patch_size * config.patch_size ** 2
    pixels = torch.randn(int(grid.prod(-1).sum()), patch, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = eager(pixels, grid_thw=grid), sdpa(pixels, grid_thw=grid)
    a = getattr(a, "pooler_output", a)
    b = getattr(b, "pooler_output", b)
    assert (a - b).abs().max().item() <= FP32_TOL


# --------------------------------------------------------------- the module vs DotProductAttention
def _config(np_, ng, hn, dtype, **overrides):
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(num_layers=4, hidden_size=np_ * hn, num_attention_heads=np_, num_query_groups=ng, kv_channels=hn,
                  attention_dropout=0.0, hidden_dropout=0.0, masked_softmax_fusion=False, params_dtype=dtype,
                  bf16=dtype == torch.bfloat16, use_cpu_initialization=True)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _run_pair(case):
    """(sdpa out, megatron out, sdpa grads, megatron grads, fp32-reference out) for one case."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_rcpa.models.attention import SDPACoreAttention

    dtype = case.get("dtype", torch.float32)
    np_, ng, hn = case["heads"]
    sq, sk, b = case["shape"]
    config = _config(np_, ng, hn, dtype, **case.get("config", {}))
    kw = dict(layer_number=case.get("layer", 1), attn_mask_type=case.get("type", AttnMaskType.causal),
              attention_type="self", softmax_scale=case.get("softmax_scale"))
    ours, theirs = SDPACoreAttention(config, **kw), DotProductAttention(config, **kw)
    ours.gqa_mode = case.get("gqa", "auto")
    mask = case.get("mask")
    forward_type = case.get("forward_type", kw["attn_mask_type"])
    out, grads = [], []
    base = _qkv(sq, sk, b, np_, ng, hn, seed=case.get("seed", 0))
    weight = torch.randn(sq, b, np_ * hn, generator=torch.Generator().manual_seed(9))
    if mask is not None:
        weight = weight * _live_rows(mask)[:, 0].T.unsqueeze(-1)
    for module, m in ((ours, mask), (theirs, case.get("megatron_mask", mask))):
        q, k, v = (t.detach().clone().to(dtype).requires_grad_() for t in base)
        o = module(q, k, v, m, attn_mask_type=forward_type)
        (o.float() * weight).sum().backward()
        out.append(o.detach().float())
        grads.append([t.grad.float() for t in (q, k, v)])
    scale = kw["softmax_scale"] or 1 / math.sqrt(hn)
    ref = megatron_reference(*[t.to(dtype) for t in base], case.get("megatron_mask", mask),
                             causal=kw["attn_mask_type"] == AttnMaskType.causal and sq == sk, scale=scale)
    live = (_live_rows(mask)[:, 0].T if mask is not None else torch.ones(sq, b, dtype=torch.bool))
    return {"ours": out[0][live], "theirs": out[1][live], "ref": ref[live], "grads": grads,
            "finite": bool(torch.isfinite(out[0]).all())}


def module_worker(cases):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_rcpa.models.attention import SDPACoreAttention

    results = {name: _run_pair(case) for name, case in cases.items()}
    # dropout: training only, through dropout_p, under megatron's RNG tracker
    config = _config(4, 2, 8, torch.float32, attention_dropout=0.5)
    module = SDPACoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    q, k, v = _qkv(6, 6, 2, 4, 2, 8)
    module.eval()
    eval_out = module(q, k, v, None)
    module.train()
    train_out = module(q, k, v, None)
    results["dropout"] = {"eval_is_deterministic": torch.equal(eval_out, module.eval()(q, k, v, None)),
                          "train_differs": not torch.allclose(train_out, eval_out),
                          "train_finite": bool(torch.isfinite(train_out).all())}
    errors = {}
    attempts = {
        "packed": lambda: SDPACoreAttention(_config(4, 2, 8, torch.float32), 1, AttnMaskType.causal, "self")(
            q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="thd")),
        "bias": lambda: SDPACoreAttention(_config(4, 2, 8, torch.float32), 1, AttnMaskType.causal, "self")(
            q, k, v, None, attention_bias=torch.zeros(1)),
        "window": lambda: SDPACoreAttention(_config(4, 2, 8, torch.float32, window_size=(4, 0)), 1,
                                            AttnMaskType.causal, "self"),
        "softmax_type": lambda: SDPACoreAttention(_config(4, 2, 8, torch.float32, softmax_type="off-by-one"), 1,
                                                  AttnMaskType.causal, "self"),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
            errors[name] = None
        except (ValueError, NotImplementedError) as exc:
            errors[name] = str(exc)
    results["errors"] = errors
    results["no_params"] = [n for n, _ in SDPACoreAttention(
        _config(4, 2, 8, torch.float32), 1, AttnMaskType.causal, "self").state_dict().items()]
    return results


def _module_cases():
    from megatron.core.transformer.enums import AttnMaskType

    pad = _padding_mask(8, 8, 3, [0, 2, 5])
    dec_pad = _padding_mask(1, 9, 3, [0, 2, 5])
    cont = _padding_mask(3, 9, 2, [0, 0])
    cases = {
        "causal_mha": {"heads": (4, 4, 8), "shape": (8, 8, 2)},
        "causal_gqa": {"heads": (4, 2, 8), "shape": (8, 8, 2)},
        "causal_mqa_grouped": {"heads": (4, 1, 8), "shape": (8, 8, 2), "gqa": "grouped"},
        "padding_gqa": {"heads": (4, 2, 8), "shape": (8, 8, 3), "mask": pad},
        "padding_gqa_grouped": {"heads": (4, 2, 8), "shape": (8, 8, 3), "mask": pad, "gqa": "grouped"},
        "vit_no_mask": {"heads": (4, 4, 8), "shape": (8, 8, 2), "type": AttnMaskType.no_mask},
        # KV-cache decode: megatron passes no_mask after the prompt and a padding mask when there is padding
        "decode": {"heads": (4, 2, 8), "shape": (1, 9, 3), "forward_type": AttnMaskType.no_mask},
        "decode_padding": {"heads": (4, 2, 8), "shape": (1, 9, 3), "mask": dec_pad,
                           "forward_type": AttnMaskType.no_mask},
        # a 3-token continuation without a mask: ours is bottom-right causal; megatron needs the explicit mask
        "continuation": {"heads": (4, 2, 8), "shape": (3, 9, 2), "megatron_mask": cont,
                         "forward_type": AttnMaskType.no_mask},
        "softmax_scale": {"heads": (4, 2, 8), "shape": (8, 8, 2), "softmax_scale": 0.7},
        "layer_scaling": {"heads": (4, 2, 8), "shape": (8, 8, 2), "layer": 3,
                          "config": {"apply_query_key_layer_scaling": True}},
        "bf16_causal_gqa": {"heads": (4, 2, 16), "shape": (32, 32, 2), "dtype": torch.bfloat16},
        "bf16_padding_gqa": {"heads": (4, 2, 16), "shape": (32, 32, 3), "dtype": torch.bfloat16,
                             "mask": _padding_mask(32, 32, 3, [0, 3, 9])},
    }
    return cases


@pytest.fixture(scope="module")
def module_results():
    from megatron_rcpa.testing.launcher import run_distributed

    return run_distributed(module_worker, world_size=1, args=(_module_cases(),), timeout=300)[0]


@pytest.mark.multiproc
def test_module_matches_dot_product_attention(module_results):
    for name, res in module_results.items():
        if name in ("dropout", "errors", "no_params"):
            continue
        assert res["finite"], name
        if name.startswith("bf16"):
            # SDPA keeps scores and P@V in fp32 and rounds once: no worse than megatron's own bf16 path
            ours = (res["ours"] - res["ref"]).abs().max().item()
            theirs = (res["theirs"] - res["ref"]).abs().max().item()
            assert ours <= max(2 * theirs, 1e-2), (name, ours, theirs)
            assert (res["ours"] - res["theirs"]).abs().max().item() <= 3e-2, name
            for g_ours, g_theirs in zip(*res["grads"]):  # bf16 gradients: a few bf16 ulps of their scale
                scale = max(1.0, g_theirs.abs().max().item())
                assert (g_ours - g_theirs).abs().max().item() <= 6e-2 * scale, name
            continue
        assert (res["ours"] - res["theirs"]).abs().max().item() <= FP32_TOL, name
        for g_ours, g_theirs in zip(*res["grads"]):
            assert (g_ours - g_theirs).abs().max().item() <= FP32_TOL, name


@pytest.mark.multiproc
def test_module_dropout_refusals_and_no_parameters(module_results):
    drop = module_results["dropout"]
    assert drop["eval_is_deterministic"] and drop["train_differs"] and drop["train_finite"]
    errors = module_results["errors"]
    assert "packed_seq_params" in errors["packed"] and "TEDotProductAttention" in errors["packed"]
    assert "attention_bias" in errors["bias"]
    assert "window_size=(4, 0)" in errors["window"]
    assert "softmax_type='off-by-one'" in errors["softmax_type"]
    assert module_results["no_params"] == []


# ------------------------------------------------------------------------------------ whole policies
def _text_config():
    import transformers

    return transformers.LlamaConfig(vocab_size=301, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    rms_norm_eps=1e-6, tie_word_embeddings=False).to_dict()


def _build_pair(family, hf_config, std=0.05):
    """(sdpa policy, megatron policy) with the same weights; and the state-dict, parameter and sharded-state-dict
    (checkpoint) names of both and of the default build."""
    from megatron_rcpa.convert.families import family_by_name
    from megatron_rcpa.models.attention import policy_attention_kwargs
    from megatron_rcpa.runtime.weights import init_global_weights

    fam = family_by_name(family)
    ours = fam.build_policy(hf_config, **policy_attention_kwargs(family, "sdpa"))
    init_global_weights(ours.language_model, seed=11, std=std)
    if family == "llava" and ours.vision_model is not None:
        init_global_weights(ours.vision_model, seed=12, std=std)
    from megatron_rcpa.models.attention import SDPACoreAttention
    from megatron_rcpa.models.norms import LocalNorm

    # the attention swap sits on the policies' own block spec: SDPA and our sequence-parallel-ready norms
    assert any(isinstance(m, SDPACoreAttention) for m in ours.language_model.modules())
    assert any(isinstance(m, LocalNorm) for m in ours.language_model.modules())
    theirs = fam.build_policy(hf_config, **policy_attention_kwargs(family, "megatron"))
    default = fam.build_policy(hf_config)
    names = {name: (list(m.state_dict()), [n for n, _ in m.named_parameters()], sorted(m.sharded_state_dict()))
             for name, m in (("sdpa", ours), ("megatron", theirs), ("default", default))}
    theirs.load_state_dict(ours.state_dict())
    for m in (ours, theirs):
        m.eval()
    return ours, theirs, names


def _policy_inputs(family, batch):
    keep = ("pixel_values", "image_grid_thw") if family == "qwen2_5_vl" else ("pixel_values",)
    return {k: batch[k] for k in keep if k in batch}


def policy_worker(jobs):
    """TP1 or TP2: per family, logits (plain, left-padded) and cached greedy decoding with both specs."""
    from megatron_rcpa.models.inference import greedy_generate

    out = {}
    for family, (hf_config, batch) in jobs.items():
        ours, theirs, names = _build_pair(family, hf_config)
        extra = _policy_inputs(family, batch)
        res = {"names": names, "live": batch["attention_mask"].bool()}
        for tag, policy in (("sdpa", ours), ("megatron", theirs)):
            with torch.no_grad():
                res[tag] = {
                    "logits": policy(input_ids=batch["input_ids"], **extra),
                    "masked": policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra),
                    "decode": greedy_generate(policy, batch["input_ids"], max_new_tokens=N_NEW, return_logits=True,
                                              **extra),
                    "masked_decode": greedy_generate(policy, batch["input_ids"], max_new_tokens=N_NEW,
                                                     attention_mask=batch["attention_mask"], return_logits=True,
                                                     **extra),
                }
            # the training path: gradients of the per-token loss of the real (unpadded) tokens
            labels = torch.randint(0, 290, batch["input_ids"].shape, generator=torch.Generator().manual_seed(7))
            policy.zero_grad()
            loss = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                          **extra)
            (loss * batch["attention_mask"]).sum().backward()
            res[tag]["grads"] = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        out[family] = res
    return out


def pp2_worker(jobs):
    from megatron_rcpa.models.inference import pipeline_greedy_generate
    from megatron_rcpa.models.pipeline import pipeline_forward

    out = {}
    for family, (hf_config, batch) in jobs.items():
        ours, theirs, names = _build_pair(family, hf_config)
        extra = _policy_inputs(family, batch)
        ids = batch["input_ids"]
        res = {"names": names, "live": batch["attention_mask"].bool()}
        for tag, policy in (("sdpa", ours), ("megatron", theirs)):
            outputs = pipeline_forward(policy, [dict(extra, input_ids=ids, attention_mask=batch["attention_mask"])],
                                       seq_length=ids.shape[1], micro_batch_size=ids.shape[0])
            tokens, logits = pipeline_greedy_generate(policy, ids, max_new_tokens=N_NEW, return_logits=True,
                                                      attention_mask=batch["attention_mask"], **extra)
            res[tag] = {"masked": outputs[0] if outputs is not None else None,
                        "masked_decode": (tokens, logits)}
        out[family] = res
    return out


def _left_padded(ids):
    mask = torch.ones_like(ids)
    mask[-1, :3] = 0
    return mask


@pytest.fixture(scope="module")
def policy_jobs(tmp_path_factory):
    """Per family: (HF config, batch with a left-padded last row)."""
    from megatron_rcpa.convert.hf_io import load_hf_config
    from megatron_rcpa.convert.verify import build_verification_batch
    from megatron_rcpa.models.tiny import save_tiny_llava, save_tiny_qwen2_5_vl

    root = tmp_path_factory.mktemp("sdpa_policies")
    jobs = {}
    for family, path in (("qwen2_5_vl", save_tiny_qwen2_5_vl(str(root / "qwen"), seed=0)),
                         ("llava", save_tiny_llava(str(root / "llava"), seed=0))):
        config = load_hf_config(path)
        batch = build_verification_batch(config, asset_dirs=[path], seed=3)
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "pixel_values", "image_grid_thw")}
        batch["attention_mask"] = _left_padded(batch["input_ids"])
        jobs[family] = (config, batch)
    ids = torch.randint(0, 290, (3, 12), generator=torch.Generator().manual_seed(5))
    jobs["llama"] = (_text_config(), {"input_ids": ids, "attention_mask": _left_padded(ids)})
    return jobs


def _check_family(res, *, logits=True):
    names = res["names"]
    assert names["sdpa"] == names["megatron"] == names["default"]
    live = res["live"]
    ours, theirs = res["sdpa"], res["megatron"]
    if logits:
        scale = max(1.0, theirs["logits"].abs().max().item())
        assert (ours["logits"] - theirs["logits"]).abs().max().item() <= FP32_TOL * scale
    if ours["masked"] is not None:
        scale = max(1.0, theirs["masked"].abs().max().item())
        assert (ours["masked"] - theirs["masked"])[live].abs().max().item() <= FP32_TOL * scale
    if "grads" in ours:
        assert sorted(ours["grads"]) == sorted(theirs["grads"]) and ours["grads"]
        for name, grad in theirs["grads"].items():
            scale = max(1.0, grad.abs().max().item())
            assert (ours["grads"][name] - grad).abs().max().item() <= FP32_TOL * scale, name
    for key in ("decode", "masked_decode"):
        if key not in ours:
            continue
        (t_ours, l_ours), (t_theirs, l_theirs) = ours[key], theirs[key]
        assert torch.equal(t_ours, t_theirs), key
        if l_theirs is not None:
            scale = max(1.0, l_theirs.abs().max().item())
            assert (l_ours - l_theirs).abs().max().item() <= FP32_TOL * scale, key


@pytest.fixture(scope="module")
def tp1_results(policy_jobs):
    from megatron_rcpa.testing.launcher import run_distributed

    return run_distributed(policy_worker, world_size=1, args=(policy_jobs,), timeout=600)[0]


@pytest.mark.multiproc
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llama", "llava"])
def test_policy_tp1_sdpa_equals_megatron(tp1_results, family):
    _check_family(tp1_results[family])


@pytest.mark.multiproc
def test_policy_tp2_llava_sharded_vit(policy_jobs):
    from megatron_rcpa.testing.launcher import run_distributed

    ranks = run_distributed(policy_worker, world_size=2, tp=2, args=({"llava": policy_jobs["llava"]},), timeout=600)
    for rank in ranks:
        _check_family(rank["llava"])


@pytest.mark.multiproc
def test_policy_pp2_qwen2_5_vl(policy_jobs):
    from megatron_rcpa.testing.launcher import run_distributed

    first, last = run_distributed(pp2_worker, world_size=2, pp=2, args=({"qwen2_5_vl": policy_jobs["qwen2_5_vl"]},),
                                  timeout=600)
    assert first["qwen2_5_vl"]["sdpa"]["masked"] is None
    _check_family(first["qwen2_5_vl"], logits=False)
    _check_family(last["qwen2_5_vl"], logits=False)
