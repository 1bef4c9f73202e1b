"""FP8 training through torchao (megatron_rcpa/models/fp8.py), checked on a CPU with torchao's emulation.

There is no FP8 matmul on a CPU, so training with ``model.fp8`` refuses here; the tests switch on
``emulate_fp8_for_tests()`` (torchao's own casts to float8, the matmul in fp32) to check the wiring:

* the GEMM function against a hand-written quantisation of this file (scales from amax, e4m3 / e5m2 casts with
  saturation, dequantised fp32 matmuls for output, grad input and grad weight): bit-identical, both recipes,
  fp32 and bf16, with a bias and a token count that is not a multiple of 16; and within FP8 tolerance of the
  plain matmul;
* whole policies (the Qwen2 text LM, QKV bias included) at TP1 and TP2 (with and without sequence parallel):
  the FP8 policy's loss and every gradient equal those of the same policy whose linears run the hand-written
  quantisation with hand-written TP communication (torch.distributed all-gather / reduce-scatter / all-reduce),
  bit for bit; and are within FP8 tolerance of the BF16/fp32 path; the weights stay the same Parameter objects
  with the same names; only the decoder's linears are converted (LM head, embedding, vision tower stay); a
  checkpoint saved from an FP8 policy loads into a plain one (and back) unchanged;
* the trainer end to end: two RCPA steps with ``model.fp8.enabled=true`` (DDP, optimizer, checkpoint) on the
  emulation; and ``model.fp8`` config errors and the CPU refusal (``rcpa-train`` exits 2 before building).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("torchao")

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


# ------------------------------------------------------------------------------ the hand-written quantisation
def _scale(x: torch.Tensor, dtype: torch.dtype, dim, pow2: bool) -> torch.Tensor:
    """fp8 max / amax (per tensor, or per slice along ``dim`` kept), computed in float64, stored in float32."""
    with torch.no_grad():
        amax = x.abs().max() if dim is None else x.abs().amax(dim=dim, keepdim=True)
        scale = (torch.finfo(dtype).max / amax.double().clamp(min=1e-12)).float()
        if pow2:
            scale = torch.exp2(torch.floor(torch.log2(scale)))
    return scale


def _dq(x: torch.Tensor, dtype: torch.dtype, dim, pow2: bool) -> torch.Tensor:
    """Quantise to ``dtype`` with saturation, dequantise to fp32."""
    s = _scale(x, dtype, dim, pow2)
    q = (x.float() * s).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    return q.float() / s


class HandFp8Matmul(torch.autograd.Function):
    """``x [M, K] @ w.T`` with every GEMM operand quantised: tensorwise (one scale per tensor, e4m3 forward, e5m2
    gradients) or rowwise (one power-of-2 scale per row of each operand along the GEMM's inner dimension, e4m3)."""

    @staticmethod
    def forward(ctx, x, w, recipe):
        ctx.save_for_backward(x, w)
        ctx.recipe = recipe
        wt = w.t()
        rw = recipe == "rowwise"
        out = torch.mm(_dq(x, E4M3, -1 if rw else None, rw), _dq(wt, E4M3, 0 if rw else None, rw))
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        rw = ctx.recipe == "rowwise"
        gdt = E4M3 if rw else E5M2
        wt = w.t()
        grad_x = torch.mm(_dq(g, gdt, -1 if rw else None, rw), _dq(wt, E4M3, -1 if rw else None, rw).t()).to(g.dtype)
        grad_w = torch.mm(_dq(g, gdt, 0 if rw else None, rw).t(), _dq(x, E4M3, 0 if rw else None, rw)).to(g.dtype)
        return grad_x, grad_w, None


def hand_fp8_linear(x, w, b, recipe):
    shape = x.shape
    out = HandFp8Matmul.apply(x.reshape(-1, shape[-1]), w, recipe).reshape(*shape[:-1], w.shape[0])
    return out + b.to(out.dtype) if b is not None else out


# ----------------------------------------------------------------------------------------- the GEMM function
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_linear_equals_hand_written_quantisation(recipe, dtype):
    from megatron_rcpa.models.fp8 import fp8_linear

    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 32, generator=gen).to(dtype)  # 15 tokens: not a multiple of 16
    w0 = (torch.randn(48, 32, generator=gen) * 0.2).to(dtype)
    b0 = torch.randn(48, generator=gen).to(dtype)
    upstream = torch.randn(5, 3, 48, generator=gen).to(dtype)
    results = []
    for fn in (lambda x, w, b: fp8_linear(x, w, b, recipe, emulate=True), lambda x, w, b: hand_fp8_linear(x, w, b,
                                                                                                            recipe)):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        out = fn(x, w, b)
        (out * upstream).sum().backward()
        results.append((out.detach(), x.grad, w.grad, b.grad))
    for got, ref, what in zip(*results, ("output", "grad input", "grad weight", "grad bias")):
        assert got.dtype == dtype and got.shape == ref.shape, what
        assert torch.equal(got, ref), (what, (got.float() - ref.float()).abs().max().item())
    # and close to the plain matmul: a few per cent (3 mantissa bits; rowwise scales per row)
    x, w = x0.float(), w0.float()
    exact = x @ w.t() + b0.float()
    err = (results[0][0].float() - exact).norm() / exact.norm()
    assert err < 0.05, err.item()


def test_fp8_linear_rejects_bad_recipes_and_cpu_without_emulation():
    from megatron_rcpa.models.fp8 import Fp8Error, check_fp8_device, torchao_float8_config

    with pytest.raises(Fp8Error, match="torchao FP8 recipe 'delayed': expected one of tensorwise, rowwise"):
        torchao_float8_config("delayed")
    if not torch.cuda.is_available():
        with pytest.raises(Fp8Error, match=r"FP8 \(torchao\) needs a CUDA GPU with FP8 tensor cores .* no FP8 matmul "
                                           r"on a CPU\. Set model.fp8.enabled=false"):
            check_fp8_device("torchao")


# ------------------------------------------------------------------------------------------- configuration
def test_fp8_config_keys_and_errors():
    from megatron_rcpa.models.fp8 import Fp8Error, resolve_backend, resolve_recipe
    from megatron_rcpa.train.config import Fp8Config, describe_options, load_config

    cfg = load_config(None, ["model.fp8.enabled=true", "model.fp8.backend=torchao", "model.fp8.recipe=rowwise"])
    assert cfg.model.fp8 == Fp8Config(enabled=True, backend="torchao", recipe="rowwise")
    assert load_config(None, []).model.fp8 == Fp8Config(enabled=False, backend="auto", recipe=None)
    for key in ("model.fp8.enabled = False", "model.fp8.backend = 'auto'", "model.fp8.recipe = None"):
        assert key in describe_options()
    for overrides, message in (
        (["model.fp8.backend=cuda"], "model.fp8.backend = 'cuda' is out of range: expected one of 'auto', 'te', "
                                     "'torchao'"),
        (["model.fp8.backend=torchao", "model.fp8.recipe=delayed"],
         "model.fp8.recipe = 'delayed' is out of range: expected one of None, 'tensorwise', 'rowwise'"),
        (["model.fp8.backend=te", "model.fp8.recipe=rowwise"], "model.fp8.recipe = 'rowwise' is out of range"),
        (["model.fp8.recipe=nvfp4"], "model.fp8.recipe = 'nvfp4' is out of range: expected one of None, 'delayed', "
                                     "'tensorwise', 'blockwise', 'mxfp8', 'rowwise'"),
        (["model.fp8.enabled=2"], "model.fp8.enabled = 2 is out of range: expected true or false"),
        (["model.fp8.speed=2"], "unknown key 'speed'"),
    ):
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            load_config(None, overrides)
    assert resolve_backend("auto", te_error=None) == "te"
    assert resolve_backend("auto", te_error="no TE") == "torchao"
    assert resolve_backend("te", te_error="no TE") == "te"
    assert resolve_recipe("te", None) == "delayed" and resolve_recipe("torchao", None) == "tensorwise"
    with pytest.raises(Fp8Error, match="model.fp8.recipe = 'delayed' is out of range for the torchao backend"):
        resolve_recipe("torchao", "delayed")  # auto resolved to torchao, with a TE-only recipe


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_training_with_fp8_on_a_cpu_refuses_before_building(tmp_path, capsys):
    from megatron_rcpa.models.fp8 import Fp8Error, enable_torchao_fp8
    from megatron_rcpa.train.cli import main
    from megatron_rcpa.train.config import check_runnable, load_config

    cfg = load_config("examples/configs/tiny_cpu.yaml", [f"run.output_dir={tmp_path}", "model.fp8.enabled=true"])
    with pytest.raises(ValueError, match="no CUDA device, and there is no FP8 matmul on a CPU"):
        check_runnable(cfg)
    rc = main(["--config", "examples/configs/tiny_cpu.yaml", f"run.output_dir={tmp_path}", "model.fp8.enabled=true",
               "model.fp8.backend=torchao"])
    err = capsys.readouterr().err
    assert rc == 2 and "FP8 (torchao) needs a CUDA GPU" in err and "there is no FP8 matmul on a CPU" in err
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))
    with pytest.raises(Fp8Error, match="no FP8 matmul on a CPU"):
        enable_torchao_fp8(torch.nn.Module(), "tensorwise")  # without the tests' emulation


def test_build_policy_with_the_te_backend(monkeypatch):
    """Where Transformer Engine resolves (faked here: TE is not installable on a CPU), the trainer's build_policy
    builds the TE layer spec with the recipe's TransformerConfig options (a caller's options win), applies no
    torchao conversion, and refuses to load a converted local-spec checkpoint into it."""
    import types

    import megatron_rcpa.models.fp8 as fp8
    from megatron_rcpa.models import families
    from megatron_rcpa.train.config import load_config
    from megatron_rcpa.train.trainer import build_policy

    calls = []
    fake = types.SimpleNamespace(build_policy=lambda hf, **kw: calls.append(kw) or torch.nn.Linear(1, 1),
                                 init_tiny_weights=lambda policy, seed: None)
    monkeypatch.setattr(families, "get", lambda name: fake)
    monkeypatch.setattr(fp8, "resolve_fp8", lambda cfg: ("te", cfg.recipe or "delayed"))
    monkeypatch.setattr(fp8, "te_layer_spec", lambda: "TE-SPEC")
    monkeypatch.setattr(fp8, "enable_torchao_fp8", lambda *a, **k: pytest.fail("torchao conversion with te"))
    cfg = load_config(None, ["model.family=qwen2", "model.tiny=true", "model.fp8.enabled=true",
                             "model.fp8.backend=te", "model.fp8.recipe=tensorwise"])
    build_policy(cfg, None)
    build_policy(cfg, None, config_overrides={"fp8": "e4m3"})
    assert calls[0]["transformer_layer_spec"] == "TE-SPEC"
    assert calls[0]["config_overrides"] == {"fp8": "hybrid", "fp8_recipe": "tensorwise"}
    assert calls[1]["config_overrides"] == {"fp8": "e4m3", "fp8_recipe": "tensorwise"}
    cfg = load_config(None, ["model.family=qwen2", "model.checkpoint=/ckpt", "model.fp8.enabled=true"])
    with pytest.raises(fp8.Fp8Error, match="model.fp8.backend = 'te' cannot load model.checkpoint = '/ckpt'.*use "
                                           "model.fp8.backend=torchao"):
        build_policy(cfg, None)


# ---------------------------------------------------------------------------------------- whole policies
def _hand_forward_impl(self, input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                       sequence_parallel=False, tp_group=None, **unused):
    """The reference linear: hand-written TP communication around the hand-written quantised GEMM."""
    group = tp_group if tp_group is not None else self.tp_group
    if sequence_parallel:
        input = _AllGatherSeq.apply(input, group)
    elif allreduce_dgrad:
        input = _AllReduceGrad.apply(input, group)
    return hand_fp8_linear(input, weight, bias, self.hand_recipe)


class _AllGatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = torch.distributed.get_world_size(group)
        out = torch.empty((x.shape[0] * world, *x.shape[1:]), dtype=x.dtype)
        torch.distributed.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        world = torch.distributed.get_world_size(ctx.group)
        out = torch.empty((g.shape[0] // world, *g.shape[1:]), dtype=g.dtype)
        torch.distributed.reduce_scatter_tensor(out, g.contiguous(), group=ctx.group)
        return out, None


class _AllReduceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        torch.distributed.all_reduce(g, group=ctx.group)
        return g, None


def _loss_and_grads(policy, tokens):
    policy.zero_grad(set_to_none=True)
    nll = policy(input_ids=tokens[:, :-1], labels=tokens[:, 1:])
    loss = nll.float().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().float().clone() for n, p in policy.named_parameters()}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def policy_worker(cases, ckpt_dir):
    """Per case (recipe, dtype, sequence parallel): plain, FP8 (torchao, emulated) and hand-reference policies
    with the same weights; losses, gradients, parameter identity, converted module names; and a checkpoint
    round trip through a plain policy."""
    from megatron_rcpa.convert.checkpoint import CheckpointMetadata, load_checkpoint, save_checkpoint
    from megatron_rcpa.models import families
    from megatron_rcpa.models.fp8 import emulate_fp8_for_tests, enable_torchao_fp8, fp8_module_names

    fam = families.get("qwen2")
    _, hf_config = fam.tiny_tokenizer_and_config()
    tokens = torch.randint(0, hf_config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    out = {}
    for name, (recipe, dtype, sp) in cases.items():
        overrides = {"sequence_parallel": True} if sp else {}

        def build(dtype=dtype, overrides=overrides):
            policy = fam.build_policy(hf_config, params_dtype=dtype, config_overrides=dict(overrides))
            fam.init_tiny_weights(policy, 7)
            return policy

        plain, fp32, fp8, hand = build(), build(torch.float32), build(), build()
        params_before = [(n, id(p)) for n, p in fp8.named_parameters()]
        with emulate_fp8_for_tests():
            converted = enable_torchao_fp8(fp8, recipe)
        linear_classes = set()
        for mname, m in hand.named_modules():
            if mname in converted:
                m.hand_recipe = recipe
                m._forward_impl = _hand_forward_impl.__get__(m)
                linear_classes.add(type(m).__name__)
        res = {"converted": converted, "fp8_names": fp8_module_names(fp8), "classes": sorted(linear_classes),
               "same_params": params_before == [(n, id(p)) for n, p in fp8.named_parameters()],
               "same_state_keys": list(fp8.state_dict()) == list(plain.state_dict()),
               "same_sharded_keys": sorted(fp8.sharded_state_dict()) == sorted(plain.sharded_state_dict())}
        losses, grads = {}, {}
        for tag, policy in (("plain", plain), ("fp32", fp32), ("fp8", fp8), ("hand", hand)):
            losses[tag], grads[tag] = _loss_and_grads(policy, tokens)
        res["losses"] = {k: v.item() for k, v in losses.items()}
        res["hand_equal"] = bool(torch.equal(losses["fp8"], losses["hand"])) and all(
            torch.equal(grads["fp8"][k], grads["hand"][k]) for k in grads["fp8"])
        res["hand_max_diff"] = max((grads["fp8"][k] - grads["hand"][k]).abs().max().item() for k in grads["fp8"])
        res["grad_rel_vs_fp32"] = {k: _rel(grads["fp8"][k], grads["fp32"][k]) for k in grads["fp8"]}
        res["plain_grad_rel_vs_fp32"] = {k: _rel(grads["plain"][k], grads["fp32"][k]) for k in grads["plain"]}
        out[name] = res

    # checkpoint: FP8 policy (perturbed weights) -> plain policy -> FP8 policy, tensors unchanged
    recipe = "tensorwise"
    src = fam.build_policy(hf_config, params_dtype=torch.bfloat16)
    fam.init_tiny_weights(src, 9)
    with emulate_fp8_for_tests():
        enable_torchao_fp8(src, recipe)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01)
    meta = CheckpointMetadata(family="qwen2", hf_config=hf_config.to_dict(), dtype="bf16",
                              vocab_size=hf_config.vocab_size, padded_vocab_size=src.padded_vocab_size)
    save_checkpoint(src, ckpt_dir, meta)
    plain = fam.build_policy(hf_config, params_dtype=torch.bfloat16)
    load_checkpoint(plain, ckpt_dir)
    back = fam.build_policy(hf_config, params_dtype=torch.bfloat16)
    with emulate_fp8_for_tests():
        enable_torchao_fp8(back, recipe)
    load_checkpoint(back, ckpt_dir)
    ref = src.state_dict()
    with torch.no_grad():
        same_loss = torch.equal(back(input_ids=tokens[:, :-1], labels=tokens[:, 1:]),
                                src(input_ids=tokens[:, :-1], labels=tokens[:, 1:]))
    out["checkpoint"] = {
        "plain_equal": all(torch.equal(v, plain.state_dict()[k]) for k, v in ref.items() if torch.is_tensor(v)),
        "fp8_equal": all(torch.equal(v, back.state_dict()[k]) for k, v in ref.items() if torch.is_tensor(v)),
        "fp8_loaded_loss_equal": bool(same_loss), "fp8_loaded_converted": len(fp8_module_names(back)),
    }
    return out


CASES_TP1 = {"tensorwise_fp32": ("tensorwise", torch.float32, False),
             "rowwise_fp32": ("rowwise", torch.float32, False),
             "tensorwise_bf16": ("tensorwise", torch.bfloat16, False),
             "rowwise_bf16": ("rowwise", torch.bfloat16, False)}
CASES_TP2 = {"tensorwise_fp32": ("tensorwise", torch.float32, False),
             "rowwise_bf16_sp": ("rowwise", torch.bfloat16, True),
             "tensorwise_fp32_sp": ("tensorwise", torch.float32, True)}
# measured on this tiny model (loss ~4.6): |loss - fp32| <= 6e-4 relative; per-tensor gradient error up to 0.115
# (tensorwise: E5M2 gradients) and 0.09 (rowwise); BF16 alone is ~0.01 from fp32
LOSS_TOL = 5e-3  # FP8 loss vs fp32: relative
GRAD_TOL = {"tensorwise": 0.2, "rowwise": 0.15}  # FP8 gradients vs fp32: relative norm error per tensor


@pytest.fixture(scope="module")
def policy_results(tmp_path_factory):
    from megatron_rcpa.testing import run_distributed

    root = tmp_path_factory.mktemp("fp8")
    tp1 = run_distributed(policy_worker, world_size=1, args=(CASES_TP1, str(root / "ckpt_tp1")), timeout=300)[0]
    tp2 = run_distributed(policy_worker, world_size=2, tp=2, args=(CASES_TP2, str(root / "ckpt_tp2")), timeout=300)
    return {"tp1": tp1, "tp2": tp2}


def _check_case(res, recipe, tp):
    # the decoder's linears only: QKV, attention output, fc1, fc2 of each layer; not the LM head / embedding
    suffixes = sorted({n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in res["converted"]})
    assert suffixes == ["mlp.linear_fc1", "mlp.linear_fc2", "self_attention.linear_proj",
                        "self_attention.linear_qkv"]
    assert len(res["converted"]) == 4 * 2 and res["fp8_names"] == res["converted"]
    assert all(n.startswith("language_model.decoder.layers.") for n in res["converted"])
    assert res["classes"] == ["ColumnParallelLinear", "RowParallelLinear"]
    assert res["same_params"] and res["same_state_keys"] and res["same_sharded_keys"]
    # bit-identical to the hand-written quantisation and communication
    assert res["hand_equal"], res["hand_max_diff"]
    # within FP8 tolerance of fp32 (and no further from it than a few times BF16's own distance where bf16)
    losses = res["losses"]
    assert abs(losses["fp8"] - losses["fp32"]) <= LOSS_TOL * abs(losses["fp32"]), (tp, losses)
    worst = max(res["grad_rel_vs_fp32"].items(), key=lambda kv: kv[1])
    assert worst[1] <= GRAD_TOL[recipe], (tp, worst)
    # and the GEMMs really were quantised: FP8 is further from fp32 than BF16 is
    assert losses["fp8"] != losses["fp32"]
    assert worst[1] > 2 * max(res["plain_grad_rel_vs_fp32"].values()) + 1e-3, (tp, worst)
    for v in losses.values():
        assert math.isfinite(v)


@pytest.mark.multiproc
@pytest.mark.megatron
def test_fp8_policy_tp1(policy_results):
    for name, res in policy_results["tp1"].items():
        if name == "checkpoint":
            continue
        _check_case(res, CASES_TP1[name][0], 1)


@pytest.mark.multiproc
@pytest.mark.megatron
def test_fp8_policy_tp2_with_and_without_sequence_parallel(policy_results):
    tp1, tp2 = policy_results["tp1"], policy_results["tp2"]
    for name in ("tensorwise_fp32", "tensorwise_fp32_sp", "rowwise_bf16_sp"):
        for rank in (0, 1):
            _check_case(tp2[rank][name], CASES_TP2[name][0], 2)
        assert tp2[0][name]["losses"] == tp2[1][name]["losses"]  # every TP rank sees the same loss
    # the same model at TP1 and TP2: the fp32 paths agree; FP8 differs only by per-shard scales
    ref = tp1["tensorwise_fp32"]["losses"]
    for name in ("tensorwise_fp32", "tensorwise_fp32_sp"):
        got = tp2[0][name]["losses"]
        assert abs(got["fp32"] - ref["fp32"]) <= 1e-5
        assert abs(got["fp8"] - ref["fp8"]) <= LOSS_TOL * abs(ref["fp32"])


@pytest.mark.multiproc
@pytest.mark.megatron
def test_fp8_checkpoints_load_unchanged(policy_results):
    for ck in [policy_results["tp1"]["checkpoint"]] + [r["checkpoint"] for r in policy_results["tp2"]]:
        assert ck == {"plain_equal": True, "fp8_equal": True, "fp8_loaded_loss_equal": True,
                      "fp8_loaded_converted": 8}


def vlm_worker() -> dict:
    """Qwen2.5-VL (HF vision tower) and LLaVA (megatron's TP-sharded ViT + projector, themselves column/row-parallel
    linears): which linears are converted, and which megatron TP linears are left alone."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_rcpa.models import families
    from megatron_rcpa.models.fp8 import emulate_fp8_for_tests, enable_torchao_fp8

    out = {}
    for name in ("qwen2_5_vl", "llava"):
        fam = families.get(name)
        _, hf_config = fam.tiny_tokenizer_and_config()
        policy = fam.build_policy(hf_config)
        keys = list(policy.state_dict())
        with emulate_fp8_for_tests():
            converted = enable_torchao_fp8(policy, "rowwise")
        tp_linears = [n for n, m in policy.named_modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
        out[name] = {"converted": converted, "left": sorted(set(tp_linears) - set(converted)),
                     "same_keys": keys == list(policy.state_dict())}
    return out


@pytest.mark.multiproc
@pytest.mark.megatron
def test_vlms_convert_only_the_language_models_decoder():
    from megatron_rcpa.testing import run_distributed

    res = run_distributed(vlm_worker, world_size=1, timeout=300)[0]
    for name, r in res.items():
        assert len(r["converted"]) == 4 * 2 and r["same_keys"], name
        assert all(n.startswith("language_model.decoder.layers.") for n in r["converted"]), name
        assert "language_model.output_layer" in r["left"], name  # the LM head stays BF16
    assert res["qwen2_5_vl"]["left"] == ["language_model.output_layer"]  # its vision tower is HF (nn.Linear)
    left = res["llava"]["left"]  # megatron's ViT and the projector stay BF16
    assert any(n.startswith("vision_model.") for n in left) and any("projection" in n for n in left), left


# ------------------------------------------------------------------------------------------- the trainer
def trainer_worker(out: str) -> dict:
    from megatron_rcpa.models.fp8 import emulate_fp8_for_tests, fp8_module_names
    from megatron_rcpa.train.config import load_config
    from megatron_rcpa.train.trainer import Trainer

    cfg = load_config("examples/configs/tiny_cpu.yaml", [
        f"run.output_dir={out}", "run.steps=2", "run.save_interval=2", "run.progress_bar=false",
        "model.family=qwen2", "model.dtype=bf16", "model.fp8.enabled=true", "model.fp8.backend=torchao",
        "model.fp8.recipe=rowwise", "data.synthetic_size=8", "data.prompts_per_step=2", "rollout.max_new_tokens=5",
        "optim.micro_batch_size=2", "rcpa.group_size=2", "logging.tensorboard=false",
        "data.path=" + os.path.join(out, "data.jsonl")])
    with emulate_fp8_for_tests():
        trainer = Trainer(cfg)
        names = fp8_module_names(trainer.model.module)
        ref_names = fp8_module_names(trainer.reference) if trainer.reference is not None else None
        history = trainer.fit()
    return {"history": history, "converted": names, "reference_converted": ref_names}


@pytest.mark.multiproc
@pytest.mark.megatron
def test_trainer_runs_two_rcpa_steps_with_fp8_emulated(tmp_path):
    import json

    from megatron_rcpa.testing import run_distributed

    (tmp_path / "data.jsonl").write_text("".join(json.dumps(
        {"id": f"s{i}", "prompt": f"What is {i} + {i + 1}?", "reference": f"\\boxed{{{2 * i + 1}}}"}) + "\n"
        for i in range(8)))
    res = run_distributed(trainer_worker, args=(str(tmp_path),), world_size=1, timeout=300)[0]
    assert len(res["converted"]) == 8
    if res["reference_converted"] is not None:  # the frozen reference (beta > 0) is built the same way
        assert res["reference_converted"] == res["converted"]
    assert len(res["history"]) == 2
    for m in res["history"]:
        assert m["update_ok"] == 1.0
        assert all(math.isfinite(m[k]) for k in ("loss", "grad_norm", "entropy"))
    step = os.path.join(tmp_path, "checkpoints", "step_0000002")
    assert os.path.exists(os.path.join(step, "trainer_state.json"))
