"""Issue 14 items 8 and 9: rows without a usable reference, over-long prompts and over-large images are skipped
and counted when read (or resized exactly as Qwen2-VL's processor does), and the sampler's exact token check."""

import json

import pytest
from PIL import Image

from megatron_rcpa.data import PromptSampler, ReaderConfig, load_samples, samples_from_rows
from megatron_rcpa.data.image_size import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, smart_resize
from megatron_rcpa.data.readers import fit_image
from megatron_rcpa.data.vision import images_to_inputs


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# ------------------------------------------------------------------------------------------ item 8: references
BAD_REFERENCE_ROWS = [
    {"id": "ok", "prompt": "p", "reference": "r"},
    {"id": "num", "prompt": "p", "reference": 3},  # numbers become text
    {"id": "none", "prompt": "p"},
    {"id": "null", "prompt": "p", "reference": None},
    {"id": "empty", "prompt": "p", "reference": ""},
    {"id": "blank", "prompt": "p", "reference": " \n"},
    {"id": "dict", "prompt": "p", "reference": {"text": "r"}},
    {"id": "dicts", "prompt": "p", "reference": [{"a": 1}]},
    {"id": "emptylist", "prompt": "p", "reference": []},
]


def test_rows_without_a_text_reference_are_skipped_and_counted_when_required(tmp_path):
    _write_jsonl(tmp_path / "refs.jsonl", BAD_REFERENCE_ROWS)
    ds = load_samples(tmp_path / "refs.jsonl", require_reference=True)
    assert ds.ids == ["ok", "num"] and [s.reference for s in ds] == ["r", "3"]
    assert dict(ds.stats.skipped) == {"missing_reference": 5, "invalid_reference": 2}
    assert ds.stats.examples["invalid_reference"] == ["dict", "dicts"]
    assert ds.stats.examples["missing_reference"] == ["none", "null", "empty", "blank", "emptylist"]
    assert "invalid_reference=2 (ids: dict, dicts)" in ds.stats.summary()
    # a reader that does not need references keeps them all, reference None
    loose = load_samples(tmp_path / "refs.jsonl")
    assert len(loose) == len(BAD_REFERENCE_ROWS) and loose[6].reference is None


def test_training_reads_with_require_reference_by_default(tmp_path):
    """The probe: a reference-less row reached the curriculum's prefix and crashed every (resumed) run."""
    pytest.importorskip("megatron.core")
    from megatron_rcpa.train.config import load_config
    from megatron_rcpa.train.trainer import build_dataset

    _write_jsonl(tmp_path / "refs.jsonl", BAD_REFERENCE_ROWS)
    cfg = load_config(None, [f"data.path={tmp_path / 'refs.jsonl'}"])
    assert cfg.data.require_reference is True
    ds = build_dataset(cfg)
    assert ds.ids == ["ok", "num"] and ds.stats.skipped["missing_reference"] == 5
    cfg = load_config(None, [f"data.path={tmp_path / 'refs.jsonl'}", "data.require_reference=false"])
    assert len(build_dataset(cfg)) == len(BAD_REFERENCE_ROWS)
    _write_jsonl(tmp_path / "none.jsonl", [{"id": "a", "prompt": "p"}])
    with pytest.raises(ValueError, match="none.jsonl.*no usable rows.*missing_reference=1"):
        build_dataset(load_config(None, [f"data.path={tmp_path / 'none.jsonl'}"]))


# ------------------------------------------------------------------------------------------ item 9: prompt length
def test_over_long_prompts_are_skipped_cheaply_at_read_time(tmp_path):
    huge = "x" * 1_080_000  # the probe's 1.08M-character prompt
    _write_jsonl(tmp_path / "long.jsonl", [
        {"id": "ok", "prompt": "y" * 80, "reference": "r"},
        {"id": "huge", "prompt": huge, "reference": "r"},
        {"id": "chat", "prompt": [{"role": "system", "content": "s" * 60}, {"role": "user", "content": "u" * 30}],
         "reference": "r"},
    ])
    ds = load_samples(tmp_path / "long.jsonl", max_prompt_chars=80)
    assert ds.ids == ["ok"] and ds.stats.examples["prompt_too_long"] == ["huge", "chat"]  # all turns count
    assert len(load_samples(tmp_path / "long.jsonl")) == 3  # no limit by default in the reader
    with pytest.raises(ValueError, match="max_prompt_chars"):
        ReaderConfig(max_prompt_chars=0)


def test_sampler_accept_hook_replaces_refused_samples_deterministically_and_counts_them():
    rows = [{"id": f"r{i}", "prompt": "p" * (50 if i in (1, 2) else 5), "reference": "r"} for i in range(6)]
    ds = samples_from_rows(rows)
    seen = []

    def accept(sample):
        seen.append(sample.id)
        return "prompt_too_long" if len(sample.prompt) > 10 else None

    s = PromptSampler(ds, 3, shuffle=False, accept=accept)
    assert [x.id for x in s.next_batch()] == ["r0", "r3", "r3"]  # r1, r2 -> the next accepted sample
    assert s.rejected == {"prompt_too_long": 2} and s.unloadable == {1, 2}
    assert ds.stats.skipped["prompt_too_long"] == 2 and ds.stats.rows_kept == 4
    assert ds.stats.examples["prompt_too_long"] == ["r1", "r2"]
    state = s.state_dict()
    seen.clear()
    assert [x.id for x in s.next_batch()] == ["r3", "r4", "r5"]
    assert seen == ["r4", "r5"] and ds.stats.skipped["prompt_too_long"] == 2  # asked once per index
    # a resumed sampler re-asks the (deterministic) hook and serves the same replacements
    fresh = PromptSampler(samples_from_rows(rows), 3, shuffle=False, accept=accept)
    assert [x.id for x in fresh.next_batch()] == ["r0", "r3", "r3"]
    fresh.load_state_dict(state)
    assert [x.id for x in fresh.next_batch()] == ["r3", "r4", "r5"]


def test_sampler_accept_hook_errors():
    ds = samples_from_rows([{"id": "a", "prompt": "p"}, {"id": "b", "prompt": "q"}])
    with pytest.raises(ValueError, match="accept hook returned 'too long'.*expected None or one of"):
        PromptSampler(ds, 1, accept=lambda s: "too long").next_batch()
    with pytest.raises(RuntimeError, match=r"none of the 2 samples.*refused: \{'prompt_too_long': 2\}"):
        PromptSampler(ds, 1, accept=lambda s: "prompt_too_long").next_batch()


def test_trainer_token_check_uses_the_family_prompt():
    pytest.importorskip("megatron.core")
    from megatron_rcpa.data.sampler import prompt_length_check
    from megatron_rcpa.train.config import load_config
    from megatron_rcpa.train.families import adapter_for, build_tokenizer_and_config

    cfg = load_config(None, ["model.tiny=true", "model.family=qwen2_5_vl"])
    tok, hf_config = build_tokenizer_and_config(cfg)
    family = adapter_for("qwen2_5_vl", tok, hf_config)
    img = Image.new("RGB", (56, 56), (255, 0, 0))
    ds = samples_from_rows([{"id": "a", "prompt": "count", "reference": "r"}])
    sample = ds[0]
    sample.images = [img]
    n = len(family.format(sample).prompt_ids)  # image tokens (4 for 56x56) included
    assert prompt_length_check(family.format, n)(sample) is None
    assert prompt_length_check(family.format, n - 1)(sample) == "prompt_too_long"
    sample.images = []
    assert prompt_length_check(family.format, n - 1)(sample) is None  # 4 image tokens (+2 markers) fewer
    with pytest.raises(ValueError, match="max_prompt_tokens = 0"):
        prompt_length_check(family.format, 0)


# ------------------------------------------------------------------------------------------ item 9: image size
def _hf_smart_resize():
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf
    except ImportError:
        hf = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl").smart_resize
    return hf


SIZES = [(1, 1), (10, 10), (27, 29), (56, 56), (57, 83), (100, 3000), (1000, 1100), (1024, 1024), (1200, 800),
         (4000, 4000), (2000, 30), (7, 1399), (3333, 1111), (511, 513)]


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("limits", [(DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS), (256 * 28 * 28, 16384 * 28 * 28),
                                    (28 * 28, 28 * 28 * 4)])
def test_smart_resize_is_the_processors_rule(h, w, limits):
    hf = _hf_smart_resize()
    lo, hi = limits
    assert smart_resize(h, w, 28, lo, hi) == hf(h, w, 28, lo, hi)
    with pytest.raises(ValueError, match="aspect ratio"):
        hf(1, 300)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 300)


def test_oversize_images_are_skipped_and_counted_by_default(tmp_path):
    Image.new("RGB", (4000, 4000), (10, 20, 30)).save(tmp_path / "huge.png")  # the probe's image
    Image.new("RGB", (1000, 1100), (10, 20, 30)).save(tmp_path / "big.png")  # rounds to 1008x1092 > 1003520
    Image.new("RGB", (1000, 1000), (10, 20, 30)).save(tmp_path / "fits.png")  # rounds to 1008x1008 = 1016064
    Image.new("RGB", (990, 990), (10, 20, 30)).save(tmp_path / "ok.png")  # rounds to 980x980
    Image.new("RGB", (300, 1), (10, 20, 30)).save(tmp_path / "line.png")  # aspect ratio 300
    _write_jsonl(tmp_path / "d.jsonl", [{"id": n, "prompt": "p", "image": f"{n}.png"}
                                        for n in ("huge", "big", "fits", "ok", "line")])
    ds = load_samples(tmp_path / "d.jsonl")
    assert ds.ids == ["ok"]
    assert dict(ds.stats.skipped) == {"image_too_large": 3, "bad_image_shape": 1}
    assert ds.stats.examples["image_too_large"] == ["huge", "big", "fits"]
    assert ds[0].images[0].size == (990, 990)  # inside the limits: untouched (the family's processor rounds it)
    assert load_samples(tmp_path / "d.jsonl", verify_images="none").ids == ["ok"]  # the header is still read
    assert load_samples(tmp_path / "d.jsonl", max_pixels=None).ids == ["huge", "big", "fits", "ok"]
    with pytest.raises(ValueError, match="oversize"):
        ReaderConfig(oversize="crop")
    with pytest.raises(ValueError, match="min_pixels = 5000 is larger than max_pixels = 4000"):
        ReaderConfig(min_pixels=5000, max_pixels=4000)


def test_oversize_resize_gives_the_processors_size_and_pixels(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    sizes = {"big": (1100, 1000), "small": (30, 20), "mid": (300, 200)}  # (h, w)
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    _write_jsonl(tmp_path / "d.jsonl", [{"id": n, "prompt": "p", "image": f"{n}.png"} for n in sizes])
    for preload in (False, True):
        ds = load_samples(tmp_path / "d.jsonl", oversize="resize", preload=preload)
        assert ds.ids == ["big", "small", "mid"] and ds.stats.total_skipped == 0
        got = {s.id: s.images[0].size[::-1] for s in ds}
        assert got["big"] == smart_resize(1100, 1000) == (1036, 952)  # scaled down (floored to 28s)
        assert got["small"] == smart_resize(30, 20) == (84, 56)  # scaled up to min_pixels (ceiled)
        assert got["mid"] == (300, 200)  # inside the limits: untouched
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:
        pytest.skip("transformers' PIL Qwen2-VL image processor is not available")
    proc = Qwen2VLImageProcessorPil()
    ds = load_samples(tmp_path / "d.jsonl", oversize="resize")
    for s in ds:
        ref = proc(images=[Image.open(tmp_path / f"{s.id}.png")], return_tensors="np")
        pv, grid, _ = images_to_inputs(s.images)
        assert grid.tolist() == ref["image_grid_thw"].tolist()
        if s.id != "mid":  # resized here exactly as the processor resizes; pixel values match to float rounding
            assert np.abs(pv.numpy() - ref["pixel_values"]).max() < 1e-4


def test_fit_image_only_resizes_in_resize_mode():
    img = Image.new("RGB", (20, 30))
    assert fit_image(img, ReaderConfig()) is img
    assert fit_image(img, ReaderConfig(oversize="resize")).size == (56, 84)
    assert fit_image(img, ReaderConfig(oversize="resize", min_pixels=None)) is img


def test_data_config_limits_and_errors():
    pytest.importorskip("megatron.core")
    from megatron_rcpa.train.config import load_config

    d = load_config(None).data
    assert (d.max_prompt_tokens, d.min_pixels, d.max_pixels, d.oversize) == (4096, 3136, 1003520, "skip")
    assert (d.min_pixels, d.max_pixels) == (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
    rc = load_config(None, ["data.max_prompt_tokens=10", "data.oversize=resize", "data.max_pixels=null",
                            "data.reference_key=extra_info.answer"]).data.reader_config()
    assert (rc.max_prompt_chars, rc.oversize, rc.max_pixels, rc.min_pixels) == (80, "resize", None, 3136)
    assert rc.require_reference is True and rc.reference_field == "extra_info.answer"
    assert d.reader_config(require_reference=False).require_reference is False  # e.g. a validation set
    assert PromptSampler.length_check is not None
    for bad, match in [({"max_prompt_tokens": 0}, "max_prompt_tokens"), ({"oversize": "crop"}, "oversize"),
                       ({"max_pixels": 100}, "data.max_pixels = 100"), ({"min_pixels": -1}, "data.min_pixels")]:
        (key, value), = bad.items()
        with pytest.raises(ValueError, match=match):
            load_config(None, [f"data.{key}={value}"])
