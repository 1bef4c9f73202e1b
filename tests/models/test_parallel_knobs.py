"""The memory knobs on the local (non-TE) spec, on vs off, for every family: sequence parallelism (TP=2),
uneven pipeline stages (PP=2, 3-layer models: the first stage holds the vision tower and the embedding),
activation recompute (full uniform / block, selective).

Two spawns. PP=2: a 3-layer Llama and a 3-layer Qwen2.5-VL, each loaded straight from its HF checkpoint into
stages of 1+2 and 2+1 layers (HF -> megatron through megatron's layer offset), exported back (megatron -> HF,
every tensor bit-identical), logits against transformers, one training step (loss and grad norm equal across
the layouts and with full recompute), cached decoding, and a checkpoint saved from the 1+2 layout. TP=2: those
checkpoints (and a LLaVA loaded from HF) with each knob: logits, one training step's loss, grad norm and every
gradient (the norms' included: finalize_model_grads all-reduces them over TP under sequence parallelism) equal
to the knob off, and KV-cache decoding with sequence parallelism on (it runs with it off).
"""

from __future__ import annotations

import os
import types

import pytest
import torch

from megatron_rcpa.models.norms import LocalNorm
from megatron_rcpa.models.parallel_knobs import stage_layers, transformer_overrides

ATOL = 1e-4  # against transformers (as the family harness)
TOL = dict(rtol=1e-5, atol=1e-6)  # knob on vs off: the same fp32 arithmetic up to reduction order

# ------------------------------------------------------------------------------------------ units


def _cfg(**model_and_parallel):
    model = types.SimpleNamespace(**{k[6:]: v for k, v in model_and_parallel.items() if k.startswith("model_")})
    par = types.SimpleNamespace(**{k[9:]: v for k, v in model_and_parallel.items() if k.startswith("parallel_")})
    return types.SimpleNamespace(model=model, parallel=par)


def test_transformer_overrides():
    assert transformer_overrides(_cfg()) == {}  # config without the model.recompute_* fields: nothing set
    assert transformer_overrides(_cfg(model_recompute_granularity="none")) == {}
    assert transformer_overrides(_cfg(model_recompute_granularity="full")) == {
        "recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    assert transformer_overrides(_cfg(model_recompute_granularity="full", model_recompute_method="block",
                                      model_recompute_num_layers=2)) == {
        "recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2}
    assert transformer_overrides(_cfg(model_recompute_granularity="selective", model_recompute_method="uniform",
                                      model_recompute_num_layers=3)) == {"recompute_granularity": "selective"}
    assert transformer_overrides(_cfg(parallel_sequence_parallel=True, parallel_num_layers_in_first_pipeline_stage=1,
                                      parallel_num_layers_in_last_pipeline_stage=None)) == {
        "sequence_parallel": True, "num_layers_in_first_pipeline_stage": 1}
    with pytest.raises(ValueError, match="model.recompute_granularity = 'some'"):
        transformer_overrides(_cfg(model_recompute_granularity="some"))
    with pytest.raises(ValueError, match="model.recompute_method = 'blocks'"):
        transformer_overrides(_cfg(model_recompute_granularity="full", model_recompute_method="blocks"))
    with pytest.raises(ValueError, match="model.recompute_num_layers = 0"):
        transformer_overrides(_cfg(model_recompute_granularity="full", model_recompute_num_layers=0))


def test_stage_layers_and_config_checks():
    from megatron_rcpa.train.config import ParallelConfig

    assert stage_layers(3, 2, first=1) == [1, 2]
    assert stage_layers(3, 2, last=1) == [2, 1]
    assert stage_layers(80, 4, first=17, last=21) == [17, 21, 21, 21]
    assert stage_layers(8, 4) == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="PP=2 does not divide num_hidden_layers=3"):
        stage_layers(3, 2)
    with pytest.raises(ValueError, match="must split evenly"):
        stage_layers(3, 2, first=1, last=1)
    with pytest.raises(ValueError, match="must split evenly"):
        stage_layers(7, 3, first=2)
    with pytest.raises(ValueError, match="num_layers_in_first_pipeline_stage = 0"):
        stage_layers(3, 2, first=0)
    ParallelConfig(tp=2, pp=2, sequence_parallel=True, num_layers_in_first_pipeline_stage=1)
    with pytest.raises(ValueError, match="parallel.sequence_parallel = true needs parallel.tp > 1"):
        ParallelConfig(tp=1, sequence_parallel=True)
    with pytest.raises(ValueError, match="parallel.sequence_parallel = 'yes'"):
        ParallelConfig(tp=2, sequence_parallel="yes")
    with pytest.raises(ValueError, match="parallel.num_layers_in_last_pipeline_stage = 2 needs parallel.pp > 1"):
        ParallelConfig(num_layers_in_last_pipeline_stage=2)
    with pytest.raises(ValueError, match="parallel.num_layers_in_first_pipeline_stage = 0 is out of range"):
        ParallelConfig(pp=2, num_layers_in_first_pipeline_stage=0)


def test_uniform_recompute_must_divide_every_stage():
    from megatron_rcpa.models.parallel_knobs import check_knobs

    full = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 2}
    check_knobs(full, num_layers=4, tp=1, pp=1)
    check_knobs(dict(full, num_layers_in_first_pipeline_stage=2), num_layers=6, tp=1, pp=2)
    with pytest.raises(ValueError, match=r"recompute_num_layers = 2 must divide .* \[3\] layers"):
        check_knobs(full, num_layers=3, tp=1, pp=1)
    with pytest.raises(ValueError, match=r"\[1, 2\] layers"):
        check_knobs(dict(full, num_layers_in_first_pipeline_stage=1), num_layers=3, tp=1, pp=2)
    check_knobs(dict(full, recompute_method="block"), num_layers=3, tp=1, pp=1)  # block: the first n layers
    with pytest.raises(ValueError, match="parallel.sequence_parallel = true needs parallel.tp > 1"):
        check_knobs({"sequence_parallel": True}, num_layers=2, tp=1, pp=1)


def test_trainer_passes_the_knobs_to_the_builder(monkeypatch):
    """train.trainer.build_policy hands transformer_overrides(cfg) to the family's builder (a caller's own
    config_overrides win)."""
    from megatron_rcpa.models import families
    from megatron_rcpa.train import trainer
    from megatron_rcpa.train.config import Fp8Config

    seen = {}

    class Fake:
        megatron_vision = False

        def build_policy(self, hf_config, **kwargs):
            seen.update(kwargs)
            return "policy"

        def init_tiny_weights(self, policy, seed):
            pass

    monkeypatch.setattr(families, "get", lambda name: Fake())
    cfg = _cfg(model_recompute_granularity="selective", parallel_sequence_parallel=True)
    cfg.model.tiny, cfg.model.dtype, cfg.model.family, cfg.model.attention = True, "fp32", "llama", "sdpa"
    cfg.model.fp8 = Fp8Config()  # off: BF16/FP32 GEMMs, the local spec
    cfg.run = types.SimpleNamespace(seed=0)
    trainer.build_policy(cfg, None)
    assert seen["config_overrides"] == {"recompute_granularity": "selective", "sequence_parallel": True}
    assert seen["transformer_layer_spec"] == "sdpa"  # the core attention on the policies' own block spec
    trainer.build_policy(cfg, None, config_overrides={"sequence_parallel": False})
    assert seen["config_overrides"] == {"recompute_granularity": "selective", "sequence_parallel": False}


@pytest.mark.parametrize("kind", ["RMSNorm", "LayerNorm"])
def test_local_norm_is_torchs_norm_and_marks_its_weights(kind):
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, normalization=kind,
                               tensor_model_parallel_size=2, sequence_parallel=True, use_cpu_initialization=True)
    norm = LocalNorm(config, 16, eps=1e-5)
    ref = (torch.nn.RMSNorm(16, eps=1e-5) if kind == "RMSNorm" else torch.nn.LayerNorm(16, eps=1e-5))
    with torch.no_grad():
        for p in list(norm.parameters()) + list(ref.parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x = torch.randn(5, 3, 16)
    assert torch.equal(norm(x), ref(x))
    assert set(norm.state_dict()) == set(ref.state_dict())
    assert all(getattr(p, "sequence_parallel", None) is True for p in norm.parameters())
    config.sequence_parallel = False
    assert all(getattr(p, "sequence_parallel", None) is False for p in LocalNorm(config, 16).parameters())


# ------------------------------------------------------------------------------------- the models
MODELS = {  # name -> (family, save_tiny_hf keywords)
    "llama3": ("llama", dict(seed=0, num_layers=3)),
    "qwen3": ("qwen2_5_vl", dict(seed=1, num_layers=3)),
    "llava": ("llava", dict(vision="clip", text="llama", seed=2)),
}
PP2_MODELS = ("llama3", "qwen3")
PP2_LAYOUTS = {  # name -> config_overrides at PP=2
    "first1": {"num_layers_in_first_pipeline_stage": 1},
    "first2": {"num_layers_in_first_pipeline_stage": 2},
    "last1_full": {"num_layers_in_last_pipeline_stage": 1, "recompute_granularity": "full",
                   "recompute_method": "uniform", "recompute_num_layers": 1},
}
TP2_KNOBS = {  # name -> config_overrides at TP=2
    "off": {},
    "sp": {"sequence_parallel": True},
    "full_uniform": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    "full_block": {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2},
    "selective": {"recompute_granularity": "selective"},
    "sp_full": {"sequence_parallel": True, "recompute_granularity": "full", "recompute_method": "block",
                "recompute_num_layers": 1},
}


def _batch(family_name, hf_dir):
    """input_ids of an odd length (sequence parallel pads to a multiple of TP), the images, a left-padding
    mask on the last row, random labels."""
    from megatron_rcpa.convert.hf_io import load_hf_config
    from megatron_rcpa.convert.verify import build_verification_batch

    config = load_hf_config(hf_dir)
    gen = torch.Generator().manual_seed(11)
    if family_name in ("llama", "qwen2"):
        ids = torch.randint(0, 301, (3, 13), generator=gen)
        inputs = {"input_ids": ids}
    else:
        b = build_verification_batch(config, asset_dirs=[hf_dir], seed=3)
        ids = b["input_ids"]
        if ids.shape[1] % 2 == 0:
            ids = torch.cat([ids, torch.randint(0, 250, (ids.shape[0], 1), generator=gen)], dim=1)
        inputs = {"input_ids": ids, "pixel_values": b["pixel_values"]}
        if "image_grid_thw" in b:
            inputs["image_grid_thw"] = b["image_grid_thw"]
    mask = torch.ones_like(inputs["input_ids"])
    mask[-1, :2] = 0
    labels = torch.randint(0, 300, inputs["input_ids"].shape, generator=gen)
    return {"inputs": inputs, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from family_harness import hf_forward, load_hf_model

    from megatron_rcpa.models import families

    root = tmp_path_factory.mktemp("knobs")
    out = {}
    for name, (family, kwargs) in MODELS.items():
        path = families.get(family).save_tiny_hf(str(root / name), **kwargs)
        batch = _batch(family, path)
        model = load_hf_model(path)
        with torch.no_grad():
            logits = hf_forward(model, batch)
            masked = hf_forward(model, batch, attention_mask=batch["attention_mask"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        out[name] = {"family": family, "path": path, "batch": batch, "logits": logits, "masked": masked,
                     "loss": float(loss)}
    return {"root": str(root), "models": out}


# ------------------------------------------------------------------------------------------- workers
def _train_once(policy, batch):
    """One optimizer step on the mean cross entropy of the labels through megatron's schedule (DDP, Adam,
    finalize_model_grads, grad clipping). Returns (loss on the last stage or None, grad norm, the global
    gradients of this stage {name: fp32 tensor})."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rcpa.models.parallel_knobs import sequence_parallel_length
    from megatron_rcpa.testing import gather_global_tensors

    policy.train()
    ddp = DistributedDataParallel(policy.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), policy)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, bf16=False,
                                                 params_dtype=torch.float32), [ddp])
    policy.config.finalize_model_grads_func = finalize_model_grads
    labels = batch["labels"]

    def step(it, model):
        out = model(**next(it))

        def loss_fn(per_token):
            loss = per_token.sum() / labels.numel()
            return loss, {"loss": loss.detach()}

        return out, loss_fn

    ddp.zero_grad_buffer()
    opt.zero_grad()
    b, s = labels.shape
    outs = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([dict(batch["inputs"], labels=labels)]), model=[ddp],
        num_microbatches=1, seq_length=sequence_parallel_length(policy.config, s), micro_batch_size=b,
        forward_only=False)
    _, grad_norm, _ = opt.step()
    loss = float(outs[0]["loss"]) if parallel_state.is_pipeline_last_stage() else None
    grads = gather_global_tensors(ddp, "grad")
    policy.config.finalize_model_grads_func = None
    return loss, float(grad_norm), grads


def pp2_worker(models, root):
    from megatron_rcpa.convert.checkpoint import save_checkpoint
    from megatron_rcpa.convert.families import family_by_name
    from megatron_rcpa.convert.hf_io import HFCheckpointReader, load_hf_config
    from megatron_rcpa.convert.hf_to_megatron import load_hf_weights, plan_hf_to_megatron
    from megatron_rcpa.convert.megatron_to_hf import export_hf_tensors
    from megatron_rcpa.models.inference import pipeline_greedy_generate
    from megatron_rcpa.models.pipeline import pipeline_forward

    out = {}
    for name in PP2_MODELS:
        m = models[name]
        family = family_by_name(m["family"])
        hf_config = family.hf_config(load_hf_config(m["path"]))
        inputs, ids = m["batch"]["inputs"], m["batch"]["inputs"]["input_ids"]
        for layout, overrides in PP2_LAYOUTS.items():
            policy = family.build_policy(hf_config, perform_initialization=False, config_overrides=overrides)
            load_hf_weights(policy, m["path"], family=family, hf_config=hf_config)  # HF -> megatron, this stage
            policy.eval()
            reader = HFCheckpointReader(m["path"], family.hf_aliases)
            exported = dict(export_hf_tensors(policy, family, hf_config))  # megatron -> HF, this stage
            res = {"layers_here": [int(layer.layer_number) for layer in policy.language_model.decoder.layers],
                   "has_vision": getattr(policy, "vision_model", None) is not None,
                   "exported": sorted(exported),
                   "not_identical": [n for n, t in exported.items() if not torch.equal(t, reader.get(n))]}
            reader.close()
            logits = pipeline_forward(policy, [dict(inputs, attention_mask=m["batch"]["attention_mask"])],
                                      seq_length=ids.shape[1], micro_batch_size=ids.shape[0])
            res["masked_logits"] = logits[0][..., :301].clone() if logits is not None else None
            res["decode"] = pipeline_greedy_generate(policy, **inputs, max_new_tokens=3)
            if layout == "first1":  # saved from uneven stages, loaded at TP=2 by the other spawn
                res["ckpt"] = os.path.join(root, f"{name}_pp2_uneven")
                save_checkpoint(policy, res["ckpt"], plan_hf_to_megatron(m["path"]).metadata(), assets_from=m["path"])
            res["loss"], res["grad_norm"], _ = _train_once(policy, m["batch"])
            out[(name, layout)] = res
    return out


def tp2_worker(models, ckpts):
    from megatron.core import parallel_state

    from megatron_rcpa.convert.checkpoint import build_policy_from_checkpoint
    from megatron_rcpa.convert.families import family_by_name
    from megatron_rcpa.convert.hf_io import load_hf_config
    from megatron_rcpa.convert.hf_to_megatron import load_hf_weights
    from megatron_rcpa.models.inference import gather_vocab_logits, greedy_generate

    out = {"tp_rank": parallel_state.get_tensor_model_parallel_rank()}
    for name, m in models.items():
        family = family_by_name(m["family"])
        inputs = m["batch"]["inputs"]
        for knob, overrides in TP2_KNOBS.items():
            if name in ckpts:
                policy, _ = build_policy_from_checkpoint(ckpts[name], config_overrides=overrides)
            else:
                hf_config = family.hf_config(load_hf_config(m["path"]))
                policy = family.build_policy(hf_config, perform_initialization=False, config_overrides=overrides)
                load_hf_weights(policy, m["path"], family=family, hf_config=hf_config)
            policy.eval()
            with torch.no_grad():
                logits = gather_vocab_logits(policy(**inputs), 301)
                masked = gather_vocab_logits(policy(**inputs, attention_mask=m["batch"]["attention_mask"]), 301)
            res = {"logits": logits, "masked": masked}
            if knob in ("off", "sp"):
                res["decode"] = greedy_generate(policy, inputs["input_ids"], max_new_tokens=3, return_logits=True,
                                                **{k: v for k, v in inputs.items() if k != "input_ids"})
                res["sp_after_decode"] = bool(policy.config.sequence_parallel)
            res["loss"], res["grad_norm"], res["grads"] = _train_once(policy, m["batch"])
            out[(name, knob)] = res
    return out


@pytest.fixture(scope="module")
def pp2(setup):
    from megatron_rcpa.testing import run_distributed

    models = {n: setup["models"][n] for n in PP2_MODELS}
    return run_distributed(pp2_worker, world_size=2, pp=2, args=(models, setup["root"]), timeout=600)


@pytest.fixture(scope="module")
def tp2(setup, pp2):
    from megatron_rcpa.testing import run_distributed

    ckpts = {n: pp2[0][(n, "first1")]["ckpt"] for n in PP2_MODELS}
    return run_distributed(tp2_worker, world_size=2, tp=2, args=(setup["models"], ckpts), timeout=600)


# --------------------------------------------------------------------------------------- PP=2 checks
@pytest.mark.multiproc
@pytest.mark.megatron
@pytest.mark.parametrize("name", PP2_MODELS)
def test_uneven_stages_convert_run_and_train(setup, pp2, name):
    from megatron_rcpa.convert.hf_io import HFCheckpointReader
    from megatron_rcpa.models import families

    ref = setup["models"][name]
    first, last = pp2
    reader = HFCheckpointReader(ref["path"], families.get(ref["family"]).hf_aliases)
    hf_names = set(reader.names())
    reader.close()
    expected_layers = {"first1": ([1], [2, 3]), "first2": ([1, 2], [3]), "last1_full": ([1, 2], [3])}
    for layout in PP2_LAYOUTS:
        a, b = first[(name, layout)], last[(name, layout)]
        assert (a["layers_here"], b["layers_here"]) == expected_layers[layout]
        if ref["family"] == "qwen2_5_vl":  # the vision tower lives on the first stage only
            assert a["has_vision"] and not b["has_vision"]
        # HF -> megatron -> HF at uneven stages: every tensor back, bit-identical, each on exactly one stage
        assert not a["not_identical"] and not b["not_identical"], layout
        assert not set(a["exported"]) & set(b["exported"])
        assert set(a["exported"]) | set(b["exported"]) == hf_names, layout
        assert a["masked_logits"] is None
        mask = ref["batch"]["attention_mask"].bool()  # the pads' own outputs are garbage (as in transformers)
        assert (b["masked_logits"] - ref["masked"])[mask].abs().max().item() <= ATOL, layout
        assert torch.equal(a["decode"], b["decode"])
        assert torch.equal(b["decode"], last[(name, "first1")]["decode"]), layout
        assert b["loss"] == pytest.approx(ref["loss"], rel=1e-5), layout
        assert a["grad_norm"] == b["grad_norm"] > 0
        assert b["grad_norm"] == pytest.approx(last[(name, "first1")]["grad_norm"], rel=1e-5), layout


# --------------------------------------------------------------------------------------- TP=2 checks
@pytest.mark.multiproc
@pytest.mark.megatron
@pytest.mark.parametrize("name", list(MODELS))
def test_tp2_knobs_match_knobs_off(setup, tp2, name):
    ref = setup["models"][name]
    r0, r1 = tp2
    off = r0[(name, "off")]
    # the checkpoint saved from uneven PP=2 stages (or the HF weights) at TP=2 == transformers
    assert (off["logits"] - ref["logits"]).abs().max().item() <= ATOL
    mask = ref["batch"]["attention_mask"].bool()  # the pads' own outputs are garbage (as in transformers)
    assert (off["masked"] - ref["masked"])[mask].abs().max().item() <= ATOL
    assert off["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    norms = [k for k in off["grads"] if "layernorm" in k or k.endswith("final_layernorm.weight")]
    assert norms and all(off["grads"][k].abs().sum() > 0 for k in norms)
    for knob in TP2_KNOBS:
        got = r0[(name, knob)]
        assert r1[(name, knob)]["loss"] == got["loss"]
        torch.testing.assert_close(got["logits"], off["logits"], **TOL, msg=lambda m, k=knob: f"{k} logits: {m}")
        torch.testing.assert_close(got["masked"][mask], off["masked"][mask], **TOL,
                                   msg=lambda m, k=knob: f"{k} masked: {m}")
        assert got["loss"] == pytest.approx(off["loss"], rel=1e-6), knob
        assert got["grad_norm"] == pytest.approx(off["grad_norm"], rel=1e-5), knob
        assert set(got["grads"]) == set(off["grads"]), knob
        for k, v in off["grads"].items():
            torch.testing.assert_close(got["grads"][k], v, **TOL, msg=lambda m, k=k, kn=knob: f"{kn} grad {k}: {m}")
    sp = r0[(name, "sp")]
    assert torch.equal(sp["decode"][0], off["decode"][0])  # KV-cache decoding runs with sequence parallel off
    torch.testing.assert_close(sp["decode"][1], off["decode"][1], **TOL)
    assert sp["sp_after_decode"] and not off["sp_after_decode"]  # ... and switches it back on


# ------------------------------------------------------------------------ TP=2 x PP=2: the trainer's step
def _rollout_batch():
    """A packed RCPA batch of odd length (sequence parallel pads it), two prompts of three rollouts with forced
    prefixes; micro-batches of two split the groups."""
    from megatron_rcpa.rollout.batch import Rollout, pack_rollouts

    g = torch.Generator().manual_seed(5)
    rollouts = []
    for p in range(2):
        prompt = torch.randint(0, 300, (4,), generator=g).tolist()
        prefix = torch.randint(0, 300, (1 + p,), generator=g).tolist()
        for j in range(3):
            gen = torch.randint(0, 300, (3 + j,), generator=g).tolist()
            rollouts.append(Rollout(p, prompt, prefix, gen, (-5.7 + 0.2 * torch.randn(len(gen), generator=g)).tolist()))
    batch = pack_rollouts(rollouts, [0.5, -1.0, 0.25, 1.0, -0.5, 0.0], pad_id=0)
    assert batch.tokens.shape[1] % 2 == 1
    return batch


def tp2pp2_worker(model):
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_rcpa.algo.config import LossConfig
    from megatron_rcpa.convert.families import family_by_name
    from megatron_rcpa.convert.hf_io import load_hf_config
    from megatron_rcpa.convert.hf_to_megatron import load_hf_weights
    from megatron_rcpa.models.inference import gather_vocab_logits
    from megatron_rcpa.models.pipeline import pipeline_forward
    from megatron_rcpa.models.policy_base import trainer_forward
    from megatron_rcpa.train.step import StepConfig, compute_logprobs, split_micro_batches, train_step

    family = family_by_name(model["family"])
    hf_config = family.hf_config(load_hf_config(model["path"]))
    inputs, ids = model["batch"]["inputs"], model["batch"]["inputs"]["input_ids"]
    micro = split_micro_batches(_rollout_batch(), 2)
    cfg = StepConfig(loss=LossConfig(beta=0.0, dual_clip=3.0), lambda_t=0.5, vocab_size=301, impl="torch")
    out = {"last": parallel_state.is_pipeline_last_stage()}
    knobs = {"off": {"num_layers_in_first_pipeline_stage": 1},
             "sp_full": {"num_layers_in_first_pipeline_stage": 1, "sequence_parallel": True,
                         "recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1}}
    for knob, overrides in knobs.items():
        policy = family.build_policy(hf_config, perform_initialization=False, config_overrides=overrides)
        load_hf_weights(policy, model["path"], family=family, hf_config=hf_config)
        logits = pipeline_forward(policy, [dict(inputs)], seq_length=ids.shape[1], micro_batch_size=ids.shape[0])
        ddp = DistributedDataParallel(policy.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), policy)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, bf16=False,
                                                     params_dtype=torch.float32), [ddp])
        policy.config.finalize_model_grads_func = finalize_model_grads
        logp = compute_logprobs(ddp, micro, cfg, trainer_forward)
        metrics = train_step(ddp, opt, micro, None, cfg, forward_fn=trainer_forward)
        out[knob] = {"logits": gather_vocab_logits(logits[0], 301) if logits is not None else None,
                     "logp": torch.cat(logp) if logp is not None else None, "metrics": metrics}
    return out


@pytest.mark.multiproc
@pytest.mark.megatron
def test_tp2_pp2_sequence_parallel_uneven_recompute_trainer_step(setup):
    """The trainer's forward-only and training passes (train/step.py) with sequence parallel + uneven stages
    + full recompute at TP=2 x PP=2 equal them without sequence parallel and recompute."""
    from megatron_rcpa.testing import run_distributed

    ref = setup["models"]["llama3"]
    results = run_distributed(tp2pp2_worker, world_size=4, tp=2, pp=2, args=(ref,), timeout=600)
    last = [r for r in results if r["last"]]
    assert len(last) == 2
    r = last[0]
    assert (r["off"]["logits"] - ref["logits"]).abs().max().item() <= ATOL
    torch.testing.assert_close(r["sp_full"]["logits"], r["off"]["logits"], **TOL)
    torch.testing.assert_close(r["sp_full"]["logp"], r["off"]["logp"], **TOL)
    assert all(x["off"]["metrics"] == r["off"]["metrics"] for x in results)  # every rank reports the same
    off, on = r["off"]["metrics"], r["sp_full"]["metrics"]
    assert off["imit_nll"] > 0 and off["grad_norm"] > 0
    for k, v in off.items():
        assert on[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k


# ---------------------------------------------------------------------------------- the trainer, end to end
def trainer_worker(out: str) -> list:
    from megatron_rcpa.train.config import load_config
    from megatron_rcpa.train.trainer import Trainer

    overrides = [f"run.output_dir={out}", "run.steps=2", "run.save_interval=2", "run.progress_bar=false",
                 "model.family=llava", "data.synthetic_size=8", "data.prompts_per_step=2",
                 "rollout.max_new_tokens=5", "rcpa.group_size=2", "logging.tensorboard=false",
                 "parallel.tp=2", "parallel.sequence_parallel=true", "optim.micro_batch_size=1"]
    return Trainer(load_config("examples/configs/tiny_cpu.yaml", overrides)).fit()


@pytest.mark.multiproc
@pytest.mark.megatron
def test_trainer_runs_with_sequence_parallel_and_split_groups(tmp_path):
    """rcpa-train (tiny LLaVA) at TP=2 with parallel.sequence_parallel=true (the static-shape rollouts decode
    with it off) and micro-batches of one rollout (groups of 2 split): two finite steps and a checkpoint."""
    import math

    from megatron_rcpa.testing import run_distributed

    out = str(tmp_path / "run")
    history = run_distributed(trainer_worker, world_size=2, tp=2, args=(out,), timeout=600)[0]
    assert len(history) == 2
    for m in history:
        assert m["update_ok"] == 1.0 and m["response_length"] > 0
        assert all(math.isfinite(m[k]) for k in ("loss", "grad_norm", "entropy", "logp_mismatch"))
    assert os.path.isdir(os.path.join(out, "checkpoints", "step_0000002", "policy"))
