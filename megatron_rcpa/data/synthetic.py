"""Synthetic domains with verifiable answers, drawn with PIL: for demos and tests, no downloads.

- ``counting``: 1-5 shapes of one kind (circle / square / triangle) plus 0-3 shapes of the other kinds, each
  in its own cell of a grid so they never overlap. "How many circles are in the image?" ->
  ``"There are 3 circles. The answer is \\boxed{3}."``
- ``geometry``: a rectangle or a right triangle with its side lengths written next to the sides (a built-in
  3x5 pixel digit font, so images are identical on every machine). Tasks: rectangle area / perimeter,
  right-triangle area, hypotenuse (Pythagorean triples). The reference gives one line of reasoning and
  ``\\boxed{answer}``.

Every sample is a pure function of ``(kind, seed, index, image_size)``: the first k samples of a dataset of n
are the samples of a dataset of k. References are a few tens of tokens and graded 1.0 by the ``math_answer``
reward. Default image sizes (56 for counting, 112 for geometry) keep a tiny Qwen2.5-VL vision tower at a few
patches.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from PIL import Image, ImageDraw

from .sample import Sample

SYNTHETIC_KINDS = ("counting", "geometry")
DEFAULT_IMAGE_SIZE = {"counting": 56, "geometry": 112}
SHAPES = ("circle", "square", "triangle")
GEOMETRY_TASKS = ("rectangle_area", "rectangle_perimeter", "triangle_area", "hypotenuse")
PYTHAGOREAN_TRIPLES = ((3, 4, 5), (6, 8, 10), (5, 12, 13), (9, 12, 15), (8, 15, 17), (12, 16, 20), (7, 24, 25))
PALETTE = ((220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 160, 20), (150, 50, 180), (20, 170, 170))
BOXED_INSTRUCTION = "Put the final answer in \\boxed{}."

# 3x5 bitmap digits, rows top to bottom
_DIGITS = {
    "0": ("111", "101", "101", "101", "111"), "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"), "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"), "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"), "7": ("111", "001", "001", "001", "001"),
    "8": ("111", "101", "111", "101", "111"), "9": ("111", "101", "111", "001", "111"),
}


def _rng(kind: str, seed: int, index: int) -> random.Random:
    return random.Random(f"{kind}:{seed}:{index}")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _text_size(text: str, scale: int) -> Tuple[int, int]:
    return (4 * len(text) - 1) * scale, 5 * scale


def _draw_digits(draw: ImageDraw.ImageDraw, xy: Tuple[int, int], text: str, scale: int, fill=(0, 0, 0)) -> None:
    x0, y0 = xy
    for k, ch in enumerate(text):
        for r, row in enumerate(_DIGITS[ch]):
            for c, bit in enumerate(row):
                if bit == "1":
                    x = x0 + (4 * k + c) * scale
                    y = y0 + r * scale
                    draw.rectangle([x, y, x + scale - 1, y + scale - 1], fill=fill)


# ---------------------------------------------------------------------------------------------- counting
def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float, color) -> None:
    if shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=color)
    elif shape == "square":
        h = half * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=color)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half * 0.8), (cx - half, cy + half * 0.8)], fill=color)


def _counting(seed: int, index: int, size: int) -> Sample:
    rng = _rng("counting", seed, index)
    target = rng.choice(SHAPES)
    count = rng.randint(1, 5)
    others = [s for s in SHAPES if s != target]
    distractors = [rng.choice(others) for _ in range(rng.randint(0, 3))]
    grid = max(3, size // 14)
    cell = size / grid
    cells = rng.sample(range(grid * grid), count + len(distractors))
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    half = cell * 0.36
    for shape, pos in zip([target] * count + distractors, cells):
        r, c = divmod(pos, grid)
        jx, jy = (rng.uniform(-0.08, 0.08) * cell for _ in range(2))
        _draw_shape(draw, shape, (c + 0.5) * cell + jx, (r + 0.5) * cell + jy, half, rng.choice(PALETTE))
    plural = f"{target}s"
    prompt = f"How many {plural} are in the image? {BOXED_INSTRUCTION}"
    noun = target if count == 1 else plural
    verb = "is" if count == 1 else "are"
    reference = f"There {verb} {count} {noun}. The answer is \\boxed{{{count}}}."
    meta = {"kind": "counting", "task": f"count_{plural}", "answer": str(count), "shape": target,
            "distractors": len(distractors)}
    return Sample(id=f"counting-{seed}-{index:06d}", prompt=prompt, reference=reference, images=[img], meta=meta)


# ---------------------------------------------------------------------------------------------- geometry
def _geometry(seed: int, index: int, size: int) -> Sample:
    rng = _rng("geometry", seed, index)
    task = rng.choice(GEOMETRY_TASKS)
    if task == "hypotenuse":
        a, b, hyp = rng.choice(PYTHAGOREAN_TRIPLES)
        if rng.random() < 0.5:
            a, b = b, a
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    scale = max(1, size // 40)
    label_w = _text_size("88", scale)[0]
    pad = 3 * scale
    left, bottom, top, right = label_w + 2 * pad, 5 * scale + 2 * pad, pad + 1, pad + 1
    unit = min((size - left - right) / a, (size - top - bottom) / b)
    w, h = a * unit, b * unit
    x0, y1 = left, size - bottom  # bottom-left corner
    x1, y0 = x0 + w, y1 - h
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    line = max(1, scale // 2 + 1)
    color = rng.choice(PALETTE)
    if task.startswith("rectangle"):
        draw.rectangle([x0, y0, x1, y1], outline=color, width=line)
        shape = "rectangle"
    else:
        draw.polygon([(x0, y1), (x1, y1), (x0, y0)], outline=color, width=line)
        m = min(4 * scale, w / 3, h / 3)
        draw.line([(x0 + m, y1), (x0 + m, y1 - m), (x0, y1 - m)], fill=(0, 0, 0), width=1)
        shape = "right triangle"
    tw, th = _text_size(str(a), scale)
    _draw_digits(draw, (int(x0 + w / 2 - tw / 2), int(y1 + pad)), str(a), scale)
    tw, th = _text_size(str(b), scale)
    _draw_digits(draw, (int(x0 - pad - tw), int(y1 - h / 2 - th / 2)), str(b), scale)

    if task == "rectangle_area":
        question, answer = "What is the area of the rectangle?", a * b
        reasoning = f"The rectangle is {a} by {b}, so its area is {a} x {b} = {answer}."
    elif task == "rectangle_perimeter":
        question, answer = "What is the perimeter of the rectangle?", 2 * (a + b)
        reasoning = f"The rectangle is {a} by {b}, so its perimeter is 2 x ({a} + {b}) = {answer}."
    elif task == "triangle_area":
        question, answer = "What is the area of the right triangle?", a * b / 2
        reasoning = f"The legs are {a} and {b}, so the area is {a} x {b} / 2 = {_fmt(answer)}."
    else:
        question, answer = "What is the length of the hypotenuse of the right triangle?", hyp
        reasoning = (f"The legs are {a} and {b}, so the hypotenuse is sqrt({a}^2 + {b}^2) = "
                     f"sqrt({a * a + b * b}) = {hyp}.")
    ans = _fmt(answer)
    prompt = f"The figure shows a {shape} with the lengths of two sides. {question} {BOXED_INSTRUCTION}"
    reference = f"{reasoning} The answer is \\boxed{{{ans}}}."
    meta = {"kind": "geometry", "task": task, "answer": ans, "sides": [a, b]}
    return Sample(id=f"geometry-{seed}-{index:06d}", prompt=prompt, reference=reference, images=[img], meta=meta)


_MAKERS = {"counting": _counting, "geometry": _geometry}


REFERENCE_STYLES = ("full", "short")


def make_synthetic_sample(kind: str, index: int, seed: int = 0, image_size: Optional[int] = None,
                          reference_style: str = "full") -> Sample:
    """Sample ``index`` of the synthetic domain ``kind`` (a pure function of its arguments).

    ``reference_style="short"`` makes the reference just ``\\boxed{answer}`` (the tiny CPU demo, whose
    model can generate a whole short answer within a few tokens)."""
    if reference_style not in REFERENCE_STYLES:
        raise ValueError(f"reference_style = {reference_style!r}: expected one of {REFERENCE_STYLES}")
    if kind not in _MAKERS:
        raise ValueError(f"unknown synthetic kind {kind!r}: expected one of {SYNTHETIC_KINDS}")
    size = DEFAULT_IMAGE_SIZE[kind] if image_size is None else int(image_size)
    if size < 28:
        raise ValueError(f"synthetic image_size = {size}: expected >= 28")
    sample = _MAKERS[kind](int(seed), int(index), size)
    if reference_style == "short":
        sample.reference = f"\\boxed{{{sample.meta['answer']}}}"
    return sample


def make_synthetic_dataset(kind: str, n: int, seed: int = 0, image_size: Optional[int] = None,
                           reference_style: str = "full") -> List[Sample]:
    """``n`` samples of ``kind`` (``counting`` | ``geometry``), deterministic in ``seed``."""
    if n < 0:
        raise ValueError(f"make_synthetic_dataset n = {n}: expected >= 0")
    return [make_synthetic_sample(kind, i, seed, image_size, reference_style) for i in range(n)]


def write_synthetic_jsonl(path: Union[str, os.PathLike], kind: str, n: int, seed: int = 0,
                          image_size: Optional[int] = None, image_dir: Optional[str] = None) -> Path:
    """Write ``n`` samples as JSONL rows ``{"id", "prompt", "reference", "image", "meta"}`` with the images as
    PNG files under ``image_dir`` (default ``<file stem>_images``, next to the JSONL file; the rows hold paths
    relative to the JSONL file's folder). Returns the JSONL path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rel_dir = image_dir if image_dir is not None else f"{path.stem}_images"
    (path.parent / rel_dir).mkdir(parents=True, exist_ok=True)
    rows: List[Dict] = []
    for s in make_synthetic_dataset(kind, n, seed, image_size):
        rel = f"{rel_dir}/{s.id}.png"
        s.images[0].save(path.parent / rel, format="PNG")
        rows.append({"id": s.id, "prompt": s.prompt, "reference": s.reference, "image": rel, "meta": s.meta})
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
