"""Qwen2.5-VL image preprocessing (data/vision.py) against transformers' ``Qwen2VLImageProcessor``: every image
goes through the processor's ``smart_resize`` rule (``min_pixels`` / ``max_pixels``), not only oversize ones;
the patch grid (``image_grid_thw``) is equal and the pixel values agree within 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_rcpa.data.image_size import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from megatron_rcpa.data.vision import images_to_inputs, qwen_pixel_limits


def _hf_processor(**kwargs):
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as cls
    except ImportError:  # transformers without the PIL backend module
        from transformers import Qwen2VLImageProcessor as cls
    return cls(**kwargs)


def _noise(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(56, 56), (100, 37), (300, 200), (28, 28), (20, 500)])
def test_patches_and_grid_equal_qwen2vl_image_processor(size):
    image = _noise(*size, seed=sum(size))
    ref = _hf_processor()(images=[image], return_tensors="pt")
    pv, grid, ntok = images_to_inputs([image])
    assert grid.tolist() == ref["image_grid_thw"].tolist()
    assert ntok == [int(ref["image_grid_thw"][0].prod()) // 4]
    torch.testing.assert_close(pv, ref["pixel_values"].float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("limits", [(28 * 28 * 4, 28 * 28 * 16), (100 * 100, 200 * 200)])
def test_min_max_pixels_follow_the_processor(limits):
    lo, hi = limits
    images = [_noise(300, 200, 1), _noise(40, 30, 2)]
    ref = _hf_processor(min_pixels=lo, max_pixels=hi)(images=images, return_tensors="pt")
    pv, grid, _ = images_to_inputs(images, min_pixels=lo, max_pixels=hi)
    assert grid.tolist() == ref["image_grid_thw"].tolist()
    torch.testing.assert_close(pv, ref["pixel_values"].float(), atol=1e-4, rtol=0)


def test_pixel_limits_from_preprocessor_config():
    assert qwen_pixel_limits(None) == (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
    assert qwen_pixel_limits({"size": {"shortest_edge": 100, "longest_edge": 5000}}) == (100, 5000)
    assert qwen_pixel_limits({"min_pixels": 200, "max_pixels": 9000, "size": {"shortest_edge": 1}}) == (200, 9000)
    with pytest.raises(ValueError, match="preprocessor_config.json: max_pixels = 'x'"):
        qwen_pixel_limits({"max_pixels": "x"})
