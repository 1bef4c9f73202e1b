"""What only the LLaVA policy has (the checks every family shares are in test_policy_families.py, on the same
spawns): the vision tower built with the layers ``vision_feature_layer`` reads, the unused HF tower tensors
kept as frozen buffers, the vision / projector gradients of a loss against transformers' (TP=1 and the
TP-sharded ViT at TP=2), the training interfaces (rollouts, log-probs, one RCPA step) at TP=2, the errors for
bad input, family detection, planning errors and transformers-4 tensor names.

Models (``family_harness.CASES["llava"]``): ``clip_llama`` (CLIP tower, ``vision_feature_layer=-2``, the last of
3 layers unused, strategy ``default``; Llama, untied, GQA 4/2) and ``siglip_qwen2`` (SigLIP, pooling head
unused, ``vision_feature_layer=-1``, strategy ``full``; Qwen2 with QKV bias, tied).
"""

from __future__ import annotations

import os

import pytest
from family_harness import ATOL, CASES

CASE = "llava"
MODELS = tuple(CASES[CASE].models)


@pytest.fixture(scope="module")
def llava_models(harness):
    return harness.models(CASE)


def _check_grads(grads, reference, rtol=1e-4):
    assert sorted(grads) == sorted(reference)
    assert "multi_modal_projector.linear_1.weight" in grads
    assert "vision_tower.encoder.layers.0.self_attn.q_proj.weight" in grads
    assert any(g.abs().max() > 0 for g in grads.values())
    for n, g in grads.items():
        scale = reference[n].abs().max().item() + 1e-6
        assert (g - reference[n]).abs().max().item() <= rtol * scale + 1e-6, n


def test_family_detection_and_vision_dims(llava_models):
    from megatron_rcpa.convert.families import family_for_config
    from megatron_rcpa.convert.hf_io import load_hf_config, read_config_dict
    from megatron_rcpa.models.llava import llava_unused_vision_tensors, llava_vision_dims

    clip = load_hf_config(llava_models["clip_llama"])
    siglip = load_hf_config(llava_models["siglip_qwen2"])
    assert family_for_config(read_config_dict(llava_models["clip_llama"])).name == "llava"
    vd = llava_vision_dims(clip)
    assert (vd.kind, vd.num_layers, vd.num_layers_used, vd.tokens_per_image) == ("clip", 3, 2, 4)
    assert sorted(llava_unused_vision_tensors(clip)) == sorted(
        [f"encoder.layers.2.{p}" for p in ("layer_norm1.bias", "layer_norm1.weight", "layer_norm2.bias",
                                            "layer_norm2.weight", "mlp.fc1.bias", "mlp.fc1.weight", "mlp.fc2.bias",
                                            "mlp.fc2.weight", "self_attn.k_proj.bias", "self_attn.k_proj.weight",
                                            "self_attn.out_proj.bias", "self_attn.out_proj.weight",
                                            "self_attn.q_proj.bias", "self_attn.q_proj.weight",
                                            "self_attn.v_proj.bias", "self_attn.v_proj.weight")]
        + ["post_layernorm.bias", "post_layernorm.weight"])
    vd = llava_vision_dims(siglip)
    assert (vd.kind, vd.num_layers_used, vd.tokens_per_image) == ("siglip", 3, 4)
    unused = llava_unused_vision_tensors(siglip)
    assert "post_layernorm.weight" in unused and "head.probe" in unused
    assert not any(n.startswith("encoder.") for n in unused)


def test_planning_and_config_errors_name_the_problem(llava_models, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_rcpa.convert.errors import ConversionError
    from megatron_rcpa.convert.hf_to_megatron import plan_hf_to_megatron

    def variant(name, **changes):
        path = tmp_path / name
        shutil.copytree(llava_models["clip_llama"], path)
        config = json.loads((path / "config.json").read_text())
        for key, value in changes.items():
            target = config
            *parents, leaf = key.split("/")
            for p in parents:
                target = target[p]
            target[leaf] = value
        (path / "config.json").write_text(json.dumps(config))
        return str(path)

    with pytest.raises(ConversionError, match="TP=8 does not divide"):
        plan_hf_to_megatron(llava_models["clip_llama"], tp=8)
    with pytest.raises(ConversionError, match=r"TP=3 does not divide"):
        plan_hf_to_megatron(llava_models["clip_llama"], tp=3)
    with pytest.raises(ConversionError, match="vision_feature_layer=\\[-2, -1\\].*several feature layers"):
        plan_hf_to_megatron(variant("multi", vision_feature_layer=[-2, -1]))
    with pytest.raises(ConversionError, match="vision_feature_layer=7 selects the output of 7 of 3"):
        plan_hf_to_megatron(variant("far", vision_feature_layer=7))
    with pytest.raises(ConversionError, match="vision_config.model_type='dinov2'"):
        plan_hf_to_megatron(variant("dino", **{"vision_config/model_type": "dinov2"}))
    with pytest.raises(ConversionError, match="projector_hidden_act='swish_glu'"):
        plan_hf_to_megatron(variant("act", projector_hidden_act="swish_glu"))
    broken = variant("broken")
    tensors = load_file(os.path.join(broken, "model.safetensors"))
    del tensors["vision_tower.encoder.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"missing tensor\(s\).*vision_tower.encoder.layers.1.self_attn.k_proj"):
        plan_hf_to_megatron(broken)


def test_transformers4_tensor_names_are_accepted(llava_models, tmp_path):
    """Hub LLaVA files written by transformers 4 keep the tower under ``vision_tower.vision_model.``."""
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_rcpa.convert.hf_to_megatron import plan_hf_to_megatron

    path = tmp_path / "legacy"
    shutil.copytree(llava_models["clip_llama"], path)
    tensors = load_file(str(path / "model.safetensors"))
    legacy = {n.replace("vision_tower.", "vision_tower.vision_model.", 1): t for n, t in tensors.items()}
    save_file(legacy, str(path / "model.safetensors"), metadata={"format": "pt"})
    plan = plan_hf_to_megatron(str(path))
    assert plan.family == "llava"


@pytest.mark.megatron
@pytest.mark.multiproc
def test_tp1_unused_tensors_vision_grads_and_errors(harness):
    tp1, reference = harness.tp1(CASE), harness.reference(CASE)
    for name in MODELS:
        res, ref = tp1[name], reference[name]
        assert res["family"] == "llava"
        assert res["unused_buffers"], "the unused HF tower tensors must be kept"
        assert res["vision_layers"] == (2 if name == "clip_llama" else 3)
        assert res["grad_loss"] == pytest.approx(ref["loss"], rel=1e-5)
        _check_grads(res["grads"], ref["grads"])
        errors = res["errors"]
        assert "image_grid_thw" in errors["grid"]
        assert "pixel_values must be [num_images, 3, 28, 28]" in errors["size"]
        assert "but pixel_values has 2 image(s)" in errors["count"]
        assert "pixel_values is None" in errors["no_pixels"]
        assert "position_ids" in errors["positions"]


@pytest.mark.megatron
@pytest.mark.multiproc
def test_tp2_sharded_vit_grads_and_training_interfaces(harness):
    import torch

    ranks, reference = harness.tp2(CASE), harness.reference(CASE)
    for name in MODELS:
        for r in ranks:
            res = r[name]
            assert res["vision_qkv_rows"] == 3 * 32 // 2  # the ViT's QKV is split over TP
            assert res["grad_loss"] == pytest.approx(reference[name]["loss"], rel=1e-5)
            _check_grads(res["grads"], reference[name]["grads"])
    # the training interfaces: rollouts on the KV cache agree with the recomputed log-probs; one RCPA step
    # moves the TP-sharded ViT and keeps its replicated LayerNorm identical on both TP ranks
    for r in ranks:
        train = r["train"]
        assert train["generated"] == 16 and train["logp_mismatch"] <= ATOL
        assert train["metrics"]["update_ok"] == 1.0 and train["metrics"]["grad_norm"] > 0
        assert train["vit_qkv_moved"] > 0
    assert torch.equal(ranks[0]["train"]["ln_pre"], ranks[1]["train"]["ln_pre"])
