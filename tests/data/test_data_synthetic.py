"""Synthetic domains: determinism, answers that are right (checked from the pixels for counting), the
math_answer reward on the references, and the JSONL + PNG round trip through the reader."""

import re

import pytest

from megatron_rcpa.data import (
    GEOMETRY_TASKS,
    SYNTHETIC_KINDS,
    PromptSampler,
    load_samples,
    make_synthetic_dataset,
    make_synthetic_sample,
    write_synthetic_jsonl,
)
from megatron_rcpa.rewards import get_reward


def _same(a, b):
    return (a.id, a.prompt, a.reference, a.meta, [im.tobytes() for im in a.images]) == \
        (b.id, b.prompt, b.reference, b.meta, [im.tobytes() for im in b.images])


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
def test_deterministic_prefix_stable_and_seed_dependent(kind):
    a = make_synthetic_dataset(kind, 12, seed=5)
    b = make_synthetic_dataset(kind, 12, seed=5)
    assert all(_same(x, y) for x, y in zip(a, b))
    assert all(_same(x, y) for x, y in zip(make_synthetic_dataset(kind, 4, seed=5), a))  # prefix of a larger set
    assert _same(make_synthetic_sample(kind, 7, seed=5), a[7])
    c = make_synthetic_dataset(kind, 12, seed=6)
    assert sum(x.images[0].tobytes() != y.images[0].tobytes() for x, y in zip(a, c)) >= 10
    assert len({s.id for s in a}) == 12


@pytest.mark.parametrize("kind, size", [("counting", 56), ("geometry", 112), ("counting", 112), ("geometry", 56)])
def test_images_are_small_rgb(kind, size):
    default = make_synthetic_sample(kind, 0)
    assert default.images[0].size == ({"counting": (56, 56), "geometry": (112, 112)}[kind])
    s = make_synthetic_sample(kind, 0, image_size=size)
    assert s.images[0].size == (size, size) and s.images[0].mode == "RGB"


def _components(img):
    """Number of 4-connected groups of non-white pixels."""
    w, h = img.size
    px = img.load()
    seen = set()
    count = 0
    for y in range(h):
        for x in range(w):
            if (x, y) in seen or px[x, y] == (255, 255, 255):
                continue
            count += 1
            stack = [(x, y)]
            seen.add((x, y))
            while stack:
                cx, cy = stack.pop()
                for nx, ny in ((cx + 1, cy), (cx - 1, cy), (cx, cy + 1), (cx, cy - 1)):
                    if 0 <= nx < w and 0 <= ny < h and (nx, ny) not in seen and px[nx, ny] != (255, 255, 255):
                        seen.add((nx, ny))
                        stack.append((nx, ny))
    return count


def test_counting_answers_match_the_pixels():
    for s in make_synthetic_dataset("counting", 25, seed=2):
        count = int(s.meta["answer"])
        shape = s.meta["shape"]
        assert 1 <= count <= 5 and f"How many {shape}s are in the image?" in s.prompt
        # every drawn shape is one separate blob: targets + distractors
        assert _components(s.images[0]) == count + s.meta["distractors"]
        noun = shape if count == 1 else shape + "s"
        assert s.reference.startswith(f"There {'is' if count == 1 else 'are'} {count} {noun}.")


def test_geometry_answers_follow_from_the_sides():
    tasks = set()
    for s in make_synthetic_dataset("geometry", 40, seed=3):
        a, b = s.meta["sides"]
        task = s.meta["task"]
        tasks.add(task)
        expected = {"rectangle_area": a * b, "rectangle_perimeter": 2 * (a + b), "triangle_area": a * b / 2,
                    "hypotenuse": (a * a + b * b) ** 0.5}[task]
        assert float(s.meta["answer"]) == pytest.approx(expected)
        assert s.reference.endswith(f"The answer is \\boxed{{{s.meta['answer']}}}.")
        assert len(s.reference.split()) < 30  # short: tens of tokens
        if task == "hypotenuse":
            assert float(s.meta["answer"]).is_integer()  # Pythagorean triples
    assert tasks == set(GEOMETRY_TASKS)


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
def test_math_answer_reward_on_references(kind):
    samples = make_synthetic_dataset(kind, 30, seed=11)
    refs = [s.reference for s in samples]
    reward = get_reward("math_answer")
    assert reward(refs, refs) == [1.0] * 30
    wrong = [re.sub(r"\\boxed\{([^}]*)\}", lambda m: "\\boxed{" + str(float(m.group(1)) + 1) + "}", r) for r in refs]
    assert reward(wrong, refs) == [0.0] * 30
    assert reward([f"The answer is {s.meta['answer']}." for s in samples], refs) == [1.0] * 30
    assert get_reward("format", preset="boxed")(refs, refs) == [1.0] * 30


def test_write_jsonl_round_trips_through_the_reader(tmp_path):
    path = write_synthetic_jsonl(tmp_path / "sub" / "count.jsonl", "counting", 6, seed=9)
    assert path == tmp_path / "sub" / "count.jsonl"
    assert len(list((tmp_path / "sub" / "count_images").glob("*.png"))) == 6
    ds = load_samples(path, require_reference=True, require_images=True)
    assert ds.stats.total_skipped == 0
    for got, want in zip(ds, make_synthetic_dataset("counting", 6, seed=9)):
        assert _same(got, want)  # PNG is lossless; meta comes back from the row's meta dict
    batch = PromptSampler(ds, 3, seed=0).next_batch()
    assert len(batch) == 3 and all(len(s.images) == 1 for s in batch)


def test_errors():
    with pytest.raises(ValueError, match="unknown synthetic kind 'maps'"):
        make_synthetic_dataset("maps", 2)
    with pytest.raises(ValueError, match="image_size"):
        make_synthetic_sample("counting", 0, image_size=8)
