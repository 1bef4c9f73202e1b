"""Images -> Qwen2.5-VL vision inputs (flattened patches + grid), as transformers' Qwen2VLImageProcessor lays
them out, without torchvision; and -> LLaVA's square tensors (:func:`image_to_square`).

An image is resized to the processor's ``smart_resize`` size (:mod:`megatron_rcpa.data.image_size`: both sides
multiples of ``patch_size * merge_size`` (28), the area within ``[min_pixels, max_pixels]``), always, as
``Qwen2VLImageProcessor`` does; normalised with the processor settings' mean/std (CLIP's by default), repeated
``temporal_patch_size`` times (a still image is a 2-frame clip), and cut into
``grid_t * grid_h * grid_w`` patches of ``C * T * P * P`` values in the processor's order (2x2 merge windows
contiguous). The prompt holds ``grid_h * grid_w / merge_size**2`` image tokens per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_rcpa.data.image_size import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, smart_resize

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionSpec:
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2

    @classmethod
    def from_hf_config(cls, hf_config) -> VisionSpec:
        v = hf_config.vision_config
        return cls(int(v.patch_size), int(v.spatial_merge_size), int(v.temporal_patch_size))


def qwen_pixel_limits(settings: Optional[Dict[str, Any]] = None) -> Tuple[int, int]:
    """(min_pixels, max_pixels) of a Qwen2-VL processor's settings (its ``preprocessor_config.json``): the
    ``min_pixels`` / ``max_pixels`` keys, else ``size.shortest_edge`` / ``size.longest_edge``, else the
    processor's defaults (56*56, 28*28*1280)."""
    settings = settings or {}
    size = settings.get("size") or {}
    lo = settings.get("min_pixels") or size.get("shortest_edge") or DEFAULT_MIN_PIXELS
    hi = settings.get("max_pixels") or size.get("longest_edge") or DEFAULT_MAX_PIXELS
    for name, v in (("min_pixels", lo), ("max_pixels", hi)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"preprocessor_config.json: {name} = {v!r}, expected a positive integer")
    return lo, hi


def image_to_patches(image, spec: VisionSpec = VisionSpec(), *, min_pixels: int = DEFAULT_MIN_PIXELS,
                     max_pixels: int = DEFAULT_MAX_PIXELS, settings: Optional[Dict[str, Any]] = None
                     ) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """A PIL image -> (patches [grid_t*grid_h*grid_w, C*T*P*P] float32, (grid_t, grid_h, grid_w)), resized to
    ``smart_resize(h, w, patch_size * merge_size, min_pixels, max_pixels)`` (bicubic) as the processor does."""
    from PIL import Image

    unit = spec.patch_size * spec.merge_size
    image = image.convert("RGB")
    w, h = image.size
    new_h, new_w = smart_resize(h, w, unit, min_pixels, max_pixels)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    x = normalize_image(np.asarray(image), settings)[None]  # [1, C, H, W]
    x = np.repeat(x, spec.temporal_patch_size, axis=0)  # [T, C, H, W]
    c, p, m, t = x.shape[1], spec.patch_size, spec.merge_size, spec.temporal_patch_size
    gh, gw = new_h // p, new_w // p
    x = x.reshape(1, t, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = torch.from_numpy(np.ascontiguousarray(x.reshape(gh * gw, c * t * p * p)))
    return patches, (1, gh, gw)


def images_to_inputs(images: Sequence, spec: VisionSpec = VisionSpec(), *, min_pixels: int = DEFAULT_MIN_PIXELS,
                     max_pixels: int = DEFAULT_MAX_PIXELS, settings: Optional[Dict[str, Any]] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """Several images -> (pixel_values [sum patches, D], image_grid_thw [N, 3], image tokens per image)."""
    if not images:
        raise ValueError("images_to_inputs: no images")
    parts, grids, ntok = [], [], []
    for img in images:
        patches, grid = image_to_patches(img, spec, min_pixels=min_pixels, max_pixels=max_pixels, settings=settings)
        parts.append(patches)
        grids.append(grid)
        ntok.append(grid[1] * grid[2] // spec.merge_size**2)
    return torch.cat(parts), torch.tensor(grids, dtype=torch.long), ntok


def normalize_image(image: np.ndarray, settings: Optional[Dict[str, Any]] = None) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> float32 [3, H, W], rescaled and normalised as an HF image processor with
    ``settings`` (its ``preprocessor_config.json``; CLIP's mean/std by default) does after resizing."""
    settings = settings or {}
    x = image.astype(np.float32)
    if settings.get("do_rescale", True):
        x = x * np.float32(settings.get("rescale_factor", 1 / 255))
    if settings.get("do_normalize", True):
        mean = np.asarray(settings.get("image_mean", CLIP_MEAN), dtype=np.float32)
        std = np.asarray(settings.get("image_std", CLIP_STD), dtype=np.float32)
        x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def image_to_square(image, size: int, settings: Optional[Dict[str, Any]] = None) -> torch.Tensor:
    """A PIL image -> [3, size, size] float32 as a LLaVA (CLIP / SigLIP) image processor makes it: CLIP
    (``crop_size`` in ``settings``) resizes the short side to ``size`` and crops the centre, SigLIP resizes to
    ``size`` x ``size``; then :func:`normalize_image` with the settings."""
    from PIL import Image

    settings = settings or {}
    image = image.convert("RGB")
    w, h = image.size
    if "crop_size" in settings:
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    elif (w, h) != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(normalize_image(np.asarray(image), settings))
