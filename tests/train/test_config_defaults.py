"""Config files extend others (`defaults: [base.yaml]`), and the global batch's split over data parallel is
checked before anything is built."""

from __future__ import annotations

import pytest

from megatron_rcpa.train.config import check_runnable, load_config


def test_defaults_merge_in_order_and_the_file_wins(tmp_path):
    (tmp_path / "a.yaml").write_text("run: {steps: 10, seed: 1}\noptim: {lr: 0.1, micro_batch_size: 4}\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\nrun: {steps: 20}\nreward: {kwargs: {x: 1}}\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.yaml").write_text("defaults: [../b.yaml]\noptim: {lr: 0.01}\nreward: {kwargs: {y: 2}}\n")
    cfg = load_config(str(sub / "c.yaml"), ["run.seed=7"])
    assert (cfg.run.steps, cfg.run.seed, cfg.optim.lr, cfg.optim.micro_batch_size) == (20, 7, 0.01, 4)
    assert cfg.reward.kwargs == {"x": 1, "y": 2}


def test_defaults_errors_name_the_file(tmp_path):
    (tmp_path / "loop1.yaml").write_text("defaults: [loop2.yaml]\n")
    (tmp_path / "loop2.yaml").write_text("defaults: [loop1.yaml]\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(str(tmp_path / "loop1.yaml"))
    (tmp_path / "missing.yaml").write_text("defaults: [nope.yaml]\n")
    with pytest.raises(FileNotFoundError, match="nope.yaml' does not exist .named in defaults: of"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("defaults: {a: 1}\n")
    with pytest.raises(ValueError, match="defaults: must be a list of config file paths"):
        load_config(str(tmp_path / "bad.yaml"))


def test_real_example_configs_share_one_base():
    for name in ("qwen2_5_vl_7b", "qwen2_5_vl_72b", "llava_1_5_7b"):
        cfg = load_config(f"examples/configs/{name}.yaml")
        assert cfg.run.steps == 500 and cfg.model.dtype == "bf16" and cfg.rcpa.group_size == 8
        assert cfg.optim.lr == 1e-6 and cfg.run.keep_last == 3
    assert load_config("examples/configs/llava_1_5_7b.yaml").rollout.max_new_tokens == 512


def test_global_batch_must_split_over_data_parallel():
    cfg = load_config(None, ["model.tiny=true", "data.prompts_per_step=6", "rcpa.group_size=2",
                             "optim.micro_batch_size=2"])
    check_runnable(cfg, world_size=3)  # DP = 3: two prompts per rank
    with pytest.raises(ValueError, match="data.prompts_per_step = 6 .* multiple of the data-parallel size 4"):
        check_runnable(cfg, world_size=4)
    cfg = load_config(None, ["model.tiny=true", "data.prompts_per_step=4", "rcpa.group_size=2",
                             "optim.micro_batch_size=2", "optim.updates_per_step=3"])
    with pytest.raises(ValueError, match="optim.updates_per_step = 3 must divide the 4 micro-batches"):
        check_runnable(cfg, world_size=1)


def test_an_empty_mapping_override_clears_the_files(tmp_path):
    (tmp_path / "a.yaml").write_text("reward: {name: composite, kwargs: {rewards: [{reward: format}]}}\n")
    assert load_config(str(tmp_path / "a.yaml"), ["reward.name=math_answer", "reward.kwargs={}"]).reward.kwargs == {}
