"""verl and TRL datasets as they are (issue 15): chat-list prompts, dotted keys, data_source / extra_info,
the shipped sample files (tests/data/fixtures, written by make_fixtures.py) read through load_samples."""

import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from megatron_rcpa.data import DataFileError, load_samples, samples_from_rows

FIXTURES = Path(__file__).parent / "fixtures"


def _fixture_script():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_verl_geometry_parquet_loads_as_it_is():
    ds = load_samples(FIXTURES / "verl_geometry.parquet", require_reference=True, require_images=True)
    assert len(ds) == 4 and ds.stats.total_skipped == 0
    s = ds[0]
    assert s.prompt == ("The legs of the right triangle are 3 and 4. Find the hypotenuse. "
                        "Put the final answer in \\boxed{}.")  # the user turn, <image> placeholder removed
    assert s.messages == [{"role": "user", "content": "<image>" + s.prompt}]  # kept exactly as in the file
    assert s.reference == "5"  # reward_model.ground_truth
    assert s.data_source == "hiyouga/geometry3k"
    assert s.extra_info == {"split": "train", "index": 0, "answer": "5",
                            "question": "The legs of the right triangle are 3 and 4. Find the hypotenuse."}
    assert s.meta == {"ability": "math", "reward_model": {"style": "rule", "ground_truth": "5"}}
    assert len(s.images) == 1 and s.images[0].size == (56, 56) and s.images[0].mode == "RGB"
    last = ds[3]
    assert len(last.images) == 2 and [m["role"] for m in last.messages] == ["system", "user"]
    assert last.prompt.startswith("The two triangles") and "careful geometry tutor" not in last.prompt
    assert [x.reference for x in ds] == ["5", "13", "17", "24"]
    assert [x.data_source for x in ds] == ["hiyouga/geometry3k"] * 3 + ["synthetic/similar_triangles"]
    # the family prompt formats take it as it is: the chat template (the character tokenizer's ChatML since issue
    # 15, was the hand-built LLaVA-1.5 form) over the row's own messages, its system turn included, with one run
    # of image tokens per image
    from megatron_rcpa.models import families

    llava = families.get("llava")
    tok = llava.tiny_tokenizer()
    hf = llava.tiny_config(tok)
    fmt = llava.make_prompt_format(tok, hf)
    prompt = fmt.format(last)
    text = tok.decode(prompt.prompt_ids, skip_special_tokens=False)
    assert prompt.pixel_values.shape[0] == 2 and text.endswith(f"{last.prompt}<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\nYou are a careful geometry tutor.<|im_end|>\n<|im_start|>user\n<image>")
    assert prompt.prompt_ids.count(int(hf.image_token_id)) == 2 * fmt.vision.tokens_per_image


def test_verl_dotted_keys_address_nested_fields():
    ds = load_samples(FIXTURES / "verl_geometry.parquet", reference_field="extra_info.question",
                      id_field="extra_info.index")
    assert ds.ids == ["0", "1", "2", "3"]
    assert ds[1].reference == "The legs of the right triangle are 5 and 12. Find the hypotenuse."


def test_trl_conversational_jsonl_loads_as_it_is():
    ds = load_samples(FIXTURES / "trl_conversational.jsonl", require_reference=True)
    assert len(ds) == 3 and ds.stats.total_skipped == 0
    assert [s.prompt for s in ds] == ["What is 7 + 5?", "How many sides does a hexagon have?",
                                      "Find the hypotenuse of this triangle."]
    assert [s.reference for s in ds] == ["7 + 5 = 12. The answer is \\boxed{12}.", "A hexagon has \\boxed{6} sides.",
                                         "It is \\boxed{5}."]  # the completion's assistant turns
    assert ds[1].messages[0] == {"role": "system", "content": "Answer briefly."}
    assert ds[2].messages[0]["content"][0] == {"type": "image"} and len(ds[2].images) == 1
    assert all(s.data_source is None and s.extra_info == {} and "completion" not in s.meta for s in ds)


def test_trl_prompt_solution_jsonl():
    ds = load_samples(FIXTURES / "trl_prompt_solution.jsonl", require_reference=True)
    assert [(s.prompt, s.reference) for s in ds] == [("Solve x + 3 = 10.", "7"),
                                                    ("What is the area of a 3 by 4 rectangle?", "12")]


def test_fixture_script_reproduces_the_shipped_files(tmp_path):
    _fixture_script().main(tmp_path)
    for name in ("trl_conversational.jsonl", "trl_prompt_solution.jsonl", "triangle.png"):
        assert (tmp_path / name).read_bytes() == (FIXTURES / name).read_bytes(), name
    assert pq.read_table(tmp_path / "verl_geometry.parquet").equals(pq.read_table(FIXTURES / "verl_geometry.parquet"))


def test_message_prompts_edge_cases(tmp_path):
    (tmp_path / "a.png").write_bytes((FIXTURES / "triangle.png").read_bytes())
    rows = [
        {"id": "two_users", "prompt": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                                       {"role": "user", "content": "second <image>"}], "images": ["a.png"]},
        {"id": "no_placeholder", "prompt": [{"role": "user", "content": "look"}], "images": ["a.png"]},
        {"id": "mismatch", "prompt": [{"role": "user", "content": "<image><image>two?"}], "images": ["a.png"]},
        {"id": "placeholder_no_image", "prompt": [{"role": "user", "content": "<image>where?"}]},
        {"id": "bad_role", "prompt": [{"role": 3, "content": "x"}]},
        {"id": "bad_content", "prompt": [{"role": "user", "content": {"x": 1}}]},
        {"id": "bad_part", "prompt": [{"role": "user", "content": [{"type": "video"}]}]},
        {"id": "not_messages", "prompt": ["a", "b"]},
        {"id": "system_only", "prompt": [{"role": "system", "content": "s"}]},
        {"id": "only_image", "prompt": [{"role": "user", "content": "<image>"}], "images": ["a.png"]},
        {"id": "empty_list", "prompt": []},
        {"id": "parquet_parts", "prompt": [{"role": "user", "content": [
            {"type": "image", "text": None}, {"type": "text", "text": "hi"}]}], "images": ["a.png"]},
    ]
    ds = samples_from_rows(rows, base_dir=tmp_path)
    assert ds.ids == ["two_users", "no_placeholder", "parquet_parts"]
    assert ds[0].prompt == "first\nsecond" and ds[2].prompt == "hi"
    assert dict(ds.stats.skipped) == {"image_count_mismatch": 2, "malformed_messages": 4, "empty_prompt": 3}
    assert ds.stats.examples["malformed_messages"] == ["bad_role", "bad_content", "bad_part", "not_messages"]
    assert ds.stats.examples["empty_prompt"] == ["system_only", "only_image", "empty_list"]


def test_reference_field_auto_order_and_explicit():
    rows = [{"id": "a", "prompt": "p", "reference": "ref", "solution": "sol"},
            {"id": "b", "prompt": "p", "solution": "sol", "reward_model": {"ground_truth": "gt"}},
            {"id": "c", "prompt": "p", "completion": "plain completion text"},
            {"id": "d", "prompt": "p", "reward_model.ground_truth": "literal dotted key"}]
    ds = samples_from_rows(rows)
    assert [s.reference for s in ds] == ["ref", "gt", "plain completion text", "literal dotted key"]
    assert ds[0].meta == {"solution": "sol"}
    assert ds[1].meta == {"solution": "sol", "reward_model": {"ground_truth": "gt"}}
    explicit = samples_from_rows(rows, reference_field="solution")
    assert [s.reference for s in explicit] == ["sol", "sol", None, None]


def test_sample_messages_are_copies():
    ds = samples_from_rows([{"id": "a", "prompt": [{"role": "user", "content": "hi"}], "extra_info": {"k": [1]}}])
    s = ds[0]
    s.messages[0]["content"] = "changed"
    s.extra_info["k"].append(2)
    assert ds[0].messages[0]["content"] == "hi" and ds[0].extra_info == {"k": [1]}
    assert json.dumps(ds[0].messages)  # plain JSON-able lists and dicts


def test_hub_style_dataset_directory(tmp_path):
    """A downloaded HF dataset repository: data/<split>-NNNNN-of-NNNNN.parquet (+ README, hidden folders)."""
    repo = tmp_path / "geo"
    (repo / "data").mkdir(parents=True)
    (repo / ".cache").mkdir()
    (repo / "README.md").write_text("---\nlicense: mit\n---\n")
    verl = (FIXTURES / "verl_geometry.parquet").read_bytes()
    (repo / "data" / "train-00000-of-00002.parquet").write_bytes(verl)
    (repo / "data" / "train-00001-of-00002.parquet").write_bytes(verl)
    (repo / "data" / "test-00000-of-00001.parquet").write_bytes(verl)
    (repo / ".cache" / "train-x.parquet").write_bytes(b"not read")
    ds = load_samples(repo)
    assert len(ds) == 8 and ds.ids[0] == "geo/data/train-00000-of-00002.parquet:0"
    assert ds.ids[4] == "geo/data/train-00001-of-00002.parquet:0" and ds[4].reference == "5"
    assert len(load_samples(repo, split="test")) == 4
    with pytest.raises(ValueError, match="has no split 'validation': expected one of \\['test', 'train'\\]"):
        load_samples(repo, split="validation")
    # JSONL files that name no split are the train split; relative image paths resolve beside each file
    flat = tmp_path / "flat"
    (flat / "sub").mkdir(parents=True)
    (flat / "sub" / "triangle.png").write_bytes((FIXTURES / "triangle.png").read_bytes())
    (flat / "sub" / "rows.jsonl").write_text((FIXTURES / "trl_conversational.jsonl").read_text())
    got = load_samples(flat, require_reference=True)
    assert len(got) == 3 and len(got[2].images) == 1
    (tmp_path / "empty" / "docs").mkdir(parents=True)
    with pytest.raises(DataFileError, match="neither a dataset saved with save_to_disk .*no state.json"):
        load_samples(tmp_path / "empty")


def test_verl_image_dicts_and_file_uris(tmp_path):
    (tmp_path / "a.png").write_bytes((FIXTURES / "triangle.png").read_bytes())
    rows = [{"id": "uri", "prompt": [{"role": "user", "content": "<image>x"}],
             "images": [{"image": f"file://{tmp_path / 'a.png'}"}]},
            {"id": "rel", "prompt": "y", "images": [{"image": "a.png"}]},
            {"id": "bytes", "prompt": "z", "images": [{"image": (tmp_path / "a.png").read_bytes()}]},
            {"id": "gone", "prompt": "w", "images": [{"image": "file:///nonexistent/b.png"}]}]
    ds = samples_from_rows(rows, base_dir=tmp_path)
    assert ds.ids == ["uri", "rel", "bytes"] and all(s.images[0].size == (56, 56) for s in ds)
    assert ds.stats.examples["missing_image"] == ["gone"]
