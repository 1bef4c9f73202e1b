"""rcpa-train configuration: YAML + key=value overrides, every default listed, errors that name the key."""

import glob
import os

import pytest

from megatron_rcpa.train.config import TrainConfig, describe_options, load_config, parse_overrides


def test_yaml_plus_overrides(tmp_path):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("run:\n  steps: 7\n  name: demo\nrcpa:\n  group_size: 4\n  loss:\n    beta: 0.02\n")
    c = load_config(str(cfg), ["run.steps=3", "rcpa.curriculum.gamma=2", 'rollout.stop=["</s>", "\\n\\n"]'])
    assert (c.run.steps, c.run.name, c.rcpa.group_size, c.rcpa.loss.beta) == (3, "demo", 4, 0.02)
    assert c.rcpa.curriculum.gamma == 2 and c.rollout.stop == ["</s>", "\n\n"]
    assert c.rcpa.loss.eps_high == 0.28  # untouched defaults survive the merge
    # rollout.max_rows: auto (the default, optionally with a KV-cache budget) or a row count
    assert (c.rollout.max_rows, c.rollout.kv_cache_gb, c.rollout.compact) == ("auto", None, True)
    c = load_config(str(cfg), ["rollout.kv_cache_gb=2.5", "rollout.compact=false"])
    assert (c.rollout.max_rows, c.rollout.kv_cache_gb, c.rollout.compact) == ("auto", 2.5, False)
    assert load_config(str(cfg), ["rollout.max_rows=48"]).rollout.max_rows == 48
    # static decode at PP > 1: rows split into PP micro-batches unless set
    assert c.rollout.pp_microbatches is None
    assert load_config(str(cfg), ["rollout.pp_microbatches=4"]).rollout.pp_microbatches == 4


@pytest.mark.parametrize("overrides, message", [
    (["run.stepz=3"], "x.yaml.run: unknown key 'stepz'; known keys: cpu_threads, export_hf, "
                      "export_max_shard_size, keep_last, kernels, log_interval"),
    (["rcpa.curriculum.rho_max=2"], "x.yaml.rcpa.curriculum: CurriculumConfig.rho_max = 2 is out of range"),
    (["parallel.tp=0"], "x.yaml.parallel: parallel.tp = 0 is out of range: expected an integer >= 1"),
    (["run=3"], "x.yaml.run: expected a mapping, got int 3"),
    (["steps"], "override 'steps': expected key=value"),
    (["optim.lr_schedule=wsd"], "optim.lr_schedule = 'wsd' is out of range: expected one of 'constant'"),
    (["rollout.max_rows=many"], "rollout.max_rows = 'many' is out of range: expected auto or an integer >= 1"),
    (["rollout.max_rows=0"], "rollout.max_rows = 0 is out of range: expected an integer >= 1"),
    (["rollout.kv_cache_gb=0"], "rollout.kv_cache_gb = 0 is out of range: expected 0.0 < kv_cache_gb"),
    (["rollout.max_rows=32", "rollout.kv_cache_gb=8"],
     "rollout.kv_cache_gb = 8 is out of range: expected unset (null) when rollout.max_rows = 32 is fixed"),
    (["rollout.compact=1"], "rollout.compact = 1 is out of range: expected true or false"),
    (["rollout.pp_microbatches=0"], "rollout.pp_microbatches = 0 is out of range: expected an integer >= 1"),
])
def test_bad_keys_and_values_are_named(tmp_path, overrides, message):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("{}\n")
    with pytest.raises(ValueError) as e:
        load_config(str(cfg), overrides)
    assert message in str(e.value)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [1,\n")
    with pytest.raises(ValueError, match="bad.yaml' is not valid YAML"):
        load_config(str(bad))


def test_every_option_is_described_with_its_default():
    text = describe_options()
    for line in ["run.steps = 100", "rcpa.group_size = 8", "rcpa.curriculum.rho_max = 0.9",
                 "rcpa.loss.eps_high = 0.28", "rcpa.advantage.estimator = 'grpo'", "parallel.tp = 1"]:
        assert line in text
    assert parse_overrides(["a.b.c=1", "a.b.d=x"]) == {"a": {"b": {"c": 1, "d": "x"}}}
    assert TrainConfig().rcpa.curriculum.f_high == 0.6


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "examples",
                                                               "configs", "*.yaml"))),
                         ids=os.path.basename)
def test_every_example_config_loads(path):
    from megatron_rcpa.train.config import load_config

    cfg = load_config(path, [])
    assert cfg.model.family in ("qwen2_5_vl", "llava", "llama", "qwen2")
