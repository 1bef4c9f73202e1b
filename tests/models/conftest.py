"""Fixtures for the Qwen2.5-VL policy tests: tiny random HF checkpoints saved locally, an image+text batch and
the HF reference computations (done once per session in the pytest process)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Two tiny Qwen2.5-VL checkpoints (fp32, vocab 301 -> padded to 384):

    * ``untied``: 4 query heads / 2 KV heads (GQA), separate lm_head;
    * ``tied_kv1``: one KV head, tied embeddings.
    """
    from megatron_rcpa.models.tiny import save_tiny_qwen2_5_vl

    root = tmp_path_factory.mktemp("tiny_qwen2_5_vl")
    return {
        "untied": save_tiny_qwen2_5_vl(str(root / "untied"), seed=0),
        "tied_kv1": save_tiny_qwen2_5_vl(str(root / "tied_kv1"), seed=1, num_key_value_heads=1,
                                         tie_word_embeddings=True),
    }


@pytest.fixture(scope="session")
def vl_batch(tiny_models):
    """Three rows of 17 tokens: one image; two images; text only. Real preprocessed (synthetic) pictures.
    ``attention_mask`` marks the first 3 tokens of the text row as left padding (used only where passed)."""
    from megatron_rcpa.convert.hf_io import load_hf_config
    from megatron_rcpa.convert.verify import build_verification_batch

    config = load_hf_config(tiny_models["untied"])
    batch = build_verification_batch(config, asset_dirs=[tiny_models["untied"]], seed=3)
    ids = batch["input_ids"]
    text_row = torch.randint(0, 250, (1, ids.shape[1]), generator=torch.Generator().manual_seed(5))
    ids = torch.cat([ids, text_row], dim=0)
    mask = torch.ones_like(ids)
    mask[2, :3] = 0  # a left-padded row, for the attention_mask checks
    return {"input_ids": ids, "pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"],
            "mm_token_type_ids": (ids == config.image_token_id).int(), "attention_mask": mask,
            "labels": torch.randint(0, config.text_config.vocab_size, ids.shape,
                                    generator=torch.Generator().manual_seed(7))}


def _hf_model(path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(model, batch, input_ids=None, attention_mask=None):
    """HF logits [B, S, V] of ``input_ids`` (default the batch's) with the batch's images."""
    ids = batch["input_ids"] if input_ids is None else input_ids
    return model(input_ids=ids, pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                 mm_token_type_ids=(ids == model.config.image_token_id).int(), attention_mask=attention_mask).logits


@pytest.fixture(scope="session")
def hf_models(tiny_models):
    return {name: _hf_model(path) for name, path in tiny_models.items()}


@pytest.fixture(scope="session")
def hf_forward():
    return hf_logits


@pytest.fixture(scope="session")
def hf_reference(tiny_models, vl_batch, hf_models):
    """HF fp32 logits of the batch for each model, and for ``untied`` the vision-tower gradients of the
    summed cross entropy against ``vl_batch['labels']``."""
    out = {}
    for name, model in hf_models.items():
        with torch.no_grad():
            out[name] = {"logits": hf_logits(model, vl_batch),
                         "masked_logits": hf_logits(model, vl_batch, attention_mask=vl_batch["attention_mask"])}
    model = _hf_model(tiny_models["untied"])
    logits = hf_logits(model, vl_batch)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), vl_batch["labels"].flatten(), reduction="sum")
    loss.backward()
    out["untied"]["loss"] = float(loss.detach())
    out["untied"]["vision_grads"] = {n[len("model.visual."):]: p.grad.clone()
                                     for n, p in model.named_parameters() if n.startswith("model.visual.")}
    return out
