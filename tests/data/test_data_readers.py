"""Readers: JSONL / parquet / HF save_to_disk directories, every bad-row reason counted with ids, file errors."""

import base64
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_rcpa.data import (
    DataFileError,
    DataStats,
    ReaderConfig,
    SampleLoadError,
    image_to_png_bytes,
    load_samples,
    samples_from_rows,
)


def _img(color, size=(8, 6)):
    return Image.new("RGB", size, color)


@pytest.fixture
def img_dir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    _img((255, 0, 0)).save(d / "red.png")
    _img((0, 255, 0)).save(d / "green.jpg", quality=95)
    _img((0, 0, 255)).convert("L").save(d / "gray.png")
    (d / "garbage.png").write_bytes(b"this is not an image at all")
    (d / "truncated.png").write_bytes(image_to_png_bytes(_img((1, 2, 3), (40, 40)))[:60])
    return d


def _write_jsonl(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write((json.dumps(line) if isinstance(line, dict) else line).encode("utf-8")
                    if not isinstance(line, bytes) else line)
            f.write(b"\n")


def test_jsonl_good_rows_all_image_forms(tmp_path, img_dir):
    blue_png = image_to_png_bytes(_img((0, 0, 255)))
    b64 = base64.b64encode(blue_png).decode()
    _write_jsonl(tmp_path / "d.jsonl", [
        {"id": "p", "prompt": "path", "reference": "r", "image": "imgs/red.png", "source": "x"},
        {"id": "abs", "prompt": "absolute path", "image": str(img_dir / "green.jpg")},
        {"id": "b64", "prompt": "base64", "images": [b64]},
        {"id": "uri", "prompt": "data uri", "image": "data:image/png;base64," + b64},
        {"id": "hf", "prompt": "hf dict", "image": {"bytes": None, "path": "imgs/gray.png"}},
        {"id": "two", "prompt": "two images", "images": ["imgs/red.png", "imgs/gray.png"], "meta": {"k": 1}},
        {"id": 7, "prompt": "text only", "reference": 12},
        "",  # blank lines are not rows
        {"prompt": "no id", "reference": ["first", "second", ""]},
    ])
    ds = load_samples(tmp_path / "d.jsonl")
    assert ds.stats.rows_read == 8 and ds.stats.rows_kept == 8 and ds.stats.total_skipped == 0
    assert ds.ids == ["p", "abs", "b64", "uri", "hf", "two", "7", "d.jsonl:9"]  # line 9 (1-based)
    s = ds[0]
    assert s.prompt == "path" and s.reference == "r" and s.meta == {"source": "x"}
    assert s.images[0].mode == "RGB" and s.images[0].getpixel((0, 0)) == (255, 0, 0)
    assert ds[1].images[0].getpixel((3, 3))[1] > 240  # jpeg, lossy
    assert ds[2].images[0].getpixel((0, 0)) == (0, 0, 255)
    assert ds[3].images[0].getpixel((0, 0)) == (0, 0, 255)
    assert ds[4].images[0].mode == "RGB"  # converted from L
    assert len(ds[5].images) == 2 and ds[5].meta == {"k": 1}
    assert ds[6].images == [] and ds[6].reference == "12" and ds[6].reference is not None
    assert ds[7].reference == "first" and ds[7].meta["all_references"] == ["first", "second"]
    assert len(ds[1:3]) == 2
    kept_mode = load_samples(tmp_path / "d.jsonl", image_mode=None)
    assert kept_mode[4].images[0].mode == "L"


def test_jsonl_every_bad_row_reason_is_counted_with_ids(tmp_path, img_dir):
    _write_jsonl(tmp_path / "bad.jsonl", [
        {"id": "ok", "prompt": "fine", "reference": "r", "image": "imgs/red.png"},
        "{not json",  # line 2
        "[1, 2]",  # line 3: JSON but not an object
        b'{"prompt": "caf\xe9"}',  # line 4: latin-1 byte, not UTF-8
        {"id": "surrogate", "prompt": "\ud800 lone surrogate", "reference": "r"},
        {"id": "empty", "prompt": "   ", "reference": "r"},
        {"id": "noprompt", "reference": "r"},
        {"id": "numprompt", "prompt": {"a": 1}, "reference": "r"},
        {"id": "noref", "prompt": "p"},
        {"id": "blankref", "prompt": "p", "reference": "  "},
        {"id": "missing", "prompt": "p", "reference": "r", "image": "imgs/nope.png"},
        {"id": "nullimg", "prompt": "p", "reference": "r", "images": [None]},
        {"id": "garbage", "prompt": "p", "reference": "r", "image": "imgs/garbage.png"},
        {"id": "badb64", "prompt": "p", "reference": "r", "image": "QUJD" * 40},
        {"id": "truncated", "prompt": "p", "reference": "r", "image": "imgs/truncated.png"},
        {"id": "ok", "prompt": "again", "reference": "r"},
        {"id": "badtype", "prompt": "p", "reference": "r", "image": 5},
    ])
    ds = load_samples(tmp_path / "bad.jsonl", require_reference=True)
    st = ds.stats
    assert ds.ids == ["ok"]
    assert st.rows_read == 17 and st.rows_kept == 1 and st.total_skipped == 16
    assert dict(st.skipped) == {"malformed_json": 2, "non_utf8": 2, "empty_prompt": 3, "missing_reference": 2,
                                "missing_image": 2, "unreadable_image": 4, "duplicate_id": 1}
    assert st.examples["malformed_json"] == ["bad.jsonl:2", "bad.jsonl:3"]
    assert st.examples["non_utf8"] == ["bad.jsonl:4", "surrogate"]
    assert st.examples["empty_prompt"] == ["empty", "noprompt", "numprompt"]
    assert st.examples["missing_reference"] == ["noref", "blankref"]
    assert st.examples["missing_image"] == ["missing", "nullimg"]
    assert st.examples["unreadable_image"] == ["garbage", "badb64", "truncated", "badtype"]
    assert st.examples["duplicate_id"] == ["ok"]
    summary = st.summary()
    assert summary.startswith(f"{tmp_path / 'bad.jsonl'}: read 17 rows, kept 1, skipped 16: malformed_json=2")
    assert "unreadable_image=4 (ids: garbage, badb64, truncated, badtype)" in summary
    # without require_reference the two reference-less rows are kept
    assert load_samples(tmp_path / "bad.jsonl").stats.rows_kept == 3


def test_only_five_ids_per_reason_are_kept(tmp_path):
    _write_jsonl(tmp_path / "e.jsonl", [{"id": f"e{i}", "prompt": ""} for i in range(8)])
    st = load_samples(tmp_path / "e.jsonl").stats
    assert st.skipped["empty_prompt"] == 8 and st.examples["empty_prompt"] == ["e0", "e1", "e2", "e3", "e4"]
    assert "empty_prompt=8 (ids: e0, e1, e2, e3, e4, ...)" in st.summary()


def test_require_images_and_full_verification(tmp_path, img_dir):
    _write_jsonl(tmp_path / "r.jsonl", [{"id": "a", "prompt": "p"},
                                        {"id": "b", "prompt": "p", "image": "imgs/red.png"}])
    ds = load_samples(tmp_path / "r.jsonl", require_images=True)
    assert ds.ids == ["b"] and ds.stats.examples["missing_image"] == ["a"]
    full = load_samples(tmp_path / "r.jsonl", verify_images="full", preload=True)
    assert full[1].images[0].getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(ValueError, match="verify_images"):
        ReaderConfig(verify_images="sometimes")


def test_custom_field_names(tmp_path, img_dir):
    _write_jsonl(tmp_path / "c.jsonl", [{"uid": "q1", "question": "what?", "answer": "that", "pic": "imgs/red.png",
                                         "image": "ignored/not/read.png"}])
    cfg = ReaderConfig(prompt_field="question", reference_field="answer", image_field="pic", id_field="uid")
    ds = load_samples(tmp_path / "c.jsonl", config=cfg)
    assert ds.ids == ["q1"] and ds[0].prompt == "what?" and ds[0].reference == "that" and len(ds[0].images) == 1
    assert ds[0].meta == {"image": "ignored/not/read.png"}


def test_json_array_file_and_multiple_files(tmp_path, img_dir):
    (tmp_path / "arr.json").write_text(json.dumps([{"prompt": "a"}, {"prompt": ""}]))
    _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "b"}, {"prompt": "a", "id": "arr.json:0"}])
    ds = load_samples([tmp_path / "arr.json", tmp_path / "d.jsonl"])
    assert ds.ids == ["arr.json:0", "d.jsonl:1"]
    assert dict(ds.stats.skipped) == {"empty_prompt": 1, "duplicate_id": 1}
    assert ds.stats.rows_read == 4 and ds.stats.rows_kept == 2


def test_missing_and_unreadable_files_are_errors_naming_them(tmp_path):
    with pytest.raises(DataFileError, match="nope.jsonl' does not exist"):
        load_samples(tmp_path / "nope.jsonl")
    with pytest.raises(DataFileError, match="nope.parquet' does not exist"):
        load_samples(tmp_path / "nope.parquet", fmt="parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataFileError, match="broken.parquet"):
        load_samples(tmp_path / "broken.parquet")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(ValueError, match="cannot tell the format of data file .*data.csv"):
        load_samples(tmp_path / "data.csv")
    (tmp_path / "notds").mkdir()
    with pytest.raises(DataFileError, match="no state.json"):
        load_samples(tmp_path / "notds")
    (tmp_path / "bad.json").write_text("[{]")
    with pytest.raises(DataFileError, match="bad.json"):
        load_samples(tmp_path / "bad.json")


def _rows_for_tables(img_dir):
    red = image_to_png_bytes(_img((255, 0, 0)))
    return [
        {"id": "t0", "prompt": "bytes", "reference": "r0", "image": {"bytes": red, "path": None}},
        {"id": "t1", "prompt": "path", "reference": None, "image": {"bytes": None, "path": "imgs/red.png"}},
        {"id": "t2", "prompt": "", "reference": "r2", "image": {"bytes": red, "path": None}},
        {"id": "t3", "prompt": "corrupt", "reference": "r3", "image": {"bytes": b"\x89PNG garbage", "path": None}},
        {"id": None, "prompt": "no image", "reference": "r4", "image": None},
    ]


def test_parquet_reader(tmp_path, img_dir):
    table = pa.Table.from_pylist(_rows_for_tables(img_dir))
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)
    ds = load_samples(tmp_path / "d.parquet")
    assert ds.ids == ["t0", "t1", "d.parquet:4"]  # 0-based row number
    assert ds[0].images[0].getpixel((0, 0)) == (255, 0, 0) and ds[1].images[0].getpixel((0, 0)) == (255, 0, 0)
    assert ds[1].reference is None
    assert dict(ds.stats.skipped) == {"empty_prompt": 1, "unreadable_image": 1}
    assert ds.stats.examples == {"empty_prompt": ["t2"], "unreadable_image": ["t3"]}


def test_parquet_binary_text_column_non_utf8(tmp_path):
    table = pa.table({"prompt": pa.array([b"ok", b"\xff\xfe bad"], type=pa.binary())})
    pq.write_table(table, tmp_path / "b.parquet")
    ds = load_samples(tmp_path / "b.parquet")
    assert [s.prompt for s in ds] == ["ok"] and ds.stats.examples["non_utf8"] == ["b.parquet:1"]


def _write_hf_dir(d, rows, n_files=2):
    """The layout of datasets' Dataset.save_to_disk: Arrow *stream* files listed in state.json."""
    d.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    per = -(-len(rows) // n_files)
    names = []
    for k in range(n_files):
        name = f"data-{k:05d}-of-{n_files:05d}.arrow"
        part = table.slice(k * per, per)
        with pa.OSFile(str(d / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(part)
        names.append({"filename": name})
    (d / "state.json").write_text(json.dumps({"_data_files": names, "_fingerprint": "x", "_split": None}))
    (d / "dataset_info.json").write_text(json.dumps({"features": {}}))


def test_hf_save_to_disk_directory(tmp_path, img_dir):
    rows = _rows_for_tables(img_dir)
    _write_hf_dir(tmp_path / "ds", rows)
    # paths inside a saved dataset are relative to the dataset directory
    (tmp_path / "ds" / "imgs").mkdir()
    _img((255, 0, 0)).save(tmp_path / "ds" / "imgs" / "red.png")
    ds = load_samples(tmp_path / "ds")
    assert ds.ids == ["t0", "t1", "ds:4"]
    assert dict(ds.stats.skipped) == {"empty_prompt": 1, "unreadable_image": 1}
    assert ds[0].images[0].getpixel((0, 0)) == (255, 0, 0)


def test_hf_dataset_dict_directory(tmp_path, img_dir):
    root = tmp_path / "dd"
    _write_hf_dir(root / "train", [{"prompt": "train row"}], n_files=1)
    _write_hf_dir(root / "test", [{"prompt": "test row"}], n_files=1)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert load_samples(root)[0].prompt == "train row"
    assert load_samples(root, split="test")[0].prompt == "test row"
    with pytest.raises(ValueError, match=r"has no split 'valid': expected one of \['train', 'test'\]"):
        load_samples(root, split="valid")
    (root / "train" / "data-00000-of-00001.arrow").unlink()
    with pytest.raises(DataFileError, match="data-00000-of-00001.arrow' does not exist"):
        load_samples(root)


def test_samples_from_rows_and_stats_merge(img_dir):
    ds = samples_from_rows([{"prompt": "a", "image": "imgs/red.png"}, {"prompt": ""}], base_dir=img_dir.parent)
    assert len(ds) == 1 and ds.stats.examples == {"empty_prompt": ["<rows>:1"]}
    total = DataStats(source="x", rows_read=1, rows_kept=1).merge(ds.stats)
    assert total.rows_read == 3 and total.skipped["empty_prompt"] == 1 and total.source == "x, <rows>"
    assert json.loads(json.dumps(total.as_dict()))["skipped"] == {"empty_prompt": 1}
    with pytest.raises(ValueError, match="unknown skip reason"):
        total.skip("other", "id")


def _truncated_jpeg(path):
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_image_decoding_failure_at_access_names_the_sample(tmp_path, img_dir):
    # a truncated JPEG passes the header check; decoding fails on access with the sample and file named,
    # and is counted then; verify_images="full" skips it at read time instead
    _truncated_jpeg(img_dir / "cut.jpg")
    _write_jsonl(tmp_path / "c.jsonl", [{"id": "cut", "prompt": "p", "image": "imgs/cut.jpg"}])
    ds = load_samples(tmp_path / "c.jsonl")
    assert len(ds) == 1
    for _ in range(2):
        with pytest.raises(SampleLoadError, match="sample 'cut': image .*cut.jpg.* cannot be decoded"):
            ds[0]
    assert ds.stats.skipped == {"unreadable_image": 1} and ds.stats.rows_kept == 0  # counted once
    full = load_samples(tmp_path / "c.jsonl", verify_images="full")
    assert len(full) == 0 and full.stats.examples["unreadable_image"] == ["cut"]


def test_real_datasets_save_to_disk_when_installed(tmp_path, monkeypatch):
    """The same reader against the real `datasets` library (not a dependency; skipped when absent)."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    red, gray = _img((255, 0, 0)), _img((9, 9, 9))
    feats = datasets.Features({"prompt": datasets.Value("string"), "images": datasets.Sequence(datasets.Image())})
    ds = datasets.Dataset.from_dict({"prompt": ["two", "none", ""], "images": [[red, gray], [], [red]]},
                                    features=feats)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    got = load_samples(tmp_path / "saved")
    assert [len(s.images) for s in got] == [2, 0] and got.stats.skipped == {"empty_prompt": 1}
    assert got[0].images[1].getpixel((0, 0)) == (9, 9, 9)
