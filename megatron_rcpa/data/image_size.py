"""Image pixel limits as Qwen2-VL / Qwen2.5-VL's image processor applies them (``smart_resize``).

The processor resizes every image to ``smart_resize(height, width, factor, min_pixels, max_pixels)``:

1. both sides rounded to the nearest multiple of ``factor`` (``patch_size * merge_size`` = 28);
2. if that rounded size holds more than ``max_pixels`` pixels, the image is scaled down by
   ``beta = sqrt(h * w / max_pixels)`` and each side *floored* to a multiple of ``factor`` (at least ``factor``);
3. else if it holds fewer than ``min_pixels``, it is scaled up by ``beta = sqrt(min_pixels / (h * w))`` and each
   side *ceiled* to a multiple of ``factor``;
4. an aspect ratio above 200 is an error.

:func:`smart_resize` is that rule, line for line (``transformers.models.qwen2_vl.image_processing_qwen2_vl``;
``tests/data/test_data_image_size.py`` compares the two). The readers use it to skip (``oversize="skip"``) or
shrink (``"resize"``) images whose rounded size is above ``max_pixels``; a decoded-then-patchified
4000x4000 image would otherwise ask the vision tower for ~20k patches of full attention.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

# Qwen2VLImageProcessor's defaults (its ``size = {"shortest_edge": 56*56, "longest_edge": 28*28*1280}``)
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
DEFAULT_FACTOR = 28  # patch_size 14 x merge_size 2
MAX_ASPECT_RATIO = 200
OVERSIZE_MODES = ("skip", "resize")


def smart_resize(height: int, width: int, factor: int = DEFAULT_FACTOR, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Tuple[int, int]:
    """(new_height, new_width) as Qwen2-VL's processor computes them (see the module docstring)."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def bad_aspect_ratio(height: int, width: int) -> bool:
    """True when the processor refuses the shape (a side of 0, or an aspect ratio above 200)."""
    return min(height, width) <= 0 or max(height, width) / min(height, width) > MAX_ASPECT_RATIO


def above_max_pixels(height: int, width: int, max_pixels: Optional[int], factor: int = DEFAULT_FACTOR) -> bool:
    """True when the processor would scale the image *down*: its factor-rounded size exceeds ``max_pixels``."""
    if max_pixels is None:
        return False
    return (round(height / factor) * factor) * (round(width / factor) * factor) > max_pixels


def below_min_pixels(height: int, width: int, min_pixels: Optional[int], factor: int = DEFAULT_FACTOR) -> bool:
    """True when the processor would scale the image *up*: its factor-rounded size is under ``min_pixels``."""
    if min_pixels is None:
        return False
    return (round(height / factor) * factor) * (round(width / factor) * factor) < min_pixels


def check_pixel_limits(min_pixels: Optional[int], max_pixels: Optional[int], where: str, factor: int) -> None:
    """Raise ``ValueError`` naming ``where`` when the limits are not integers or cannot hold one factor^2 tile."""
    for name, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{where}.{name} = {v!r}: expected a positive integer or null")
    if max_pixels is not None and max_pixels < factor * factor:
        raise ValueError(f"{where}.max_pixels = {max_pixels}: expected at least factor^2 = {factor * factor} "
                         f"(one {factor}x{factor} tile)")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise ValueError(f"{where}.min_pixels = {min_pixels} is larger than max_pixels = {max_pixels}")
