"""Bad configs refused at load time with exit 2, before any model is built (issue 14.11); YAML 1.2 numbers in
overrides (14.12); a torn metrics.jsonl line does not break rcpa-plot (14.13)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_rcpa.train.config import check_runnable, load_config, parse_overrides

TINY = "examples/configs/tiny_cpu.yaml"


def _cli(*args, env=None):
    import os

    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "megatron_rcpa.train", "--config", TINY, "run.steps=1",
                           "run.progress_bar=false", *args], capture_output=True, text=True, timeout=120, env=full_env)


@pytest.mark.parametrize("args, env, message", [
    (["reward.kwargs=5"], None, "reward.kwargs = 5 is out of range: expected a mapping"),
    (["reward.name=no_such_reward", "reward.kwargs={}"], None, "reward.name = 'no_such_reward'"),
    (["parallel.tp=2"], None, "parallel.tp x parallel.pp = 2 x 1 = 2 does not divide the world size 1"),
    (["parallel.pp=2"], {"WORLD_SIZE": "3"}, "does not divide the world size 3"),
    (["model.family=qwen2"], None, "model.family = 'qwen2' is a text model but the synthetic data"),
    (["run.resume=sometimes"], None, "run.resume = 'sometimes' is out of range: expected auto, never, or an existing"),
    (["model.checkpoint=/tmp"], None, "model.tiny = true and model.checkpoint = '/tmp' exclude each other"),
])
def test_bad_configs_exit_2_before_any_model_is_built(tmp_path, args, env, message):
    res = _cli(f"run.output_dir={tmp_path / 'run'}", *args, env=env)
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr and res.stderr.startswith("rcpa-train: error: "), res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()  # nothing was built or written


def test_text_family_with_an_image_column_is_refused(tmp_path):
    rows = [{"prompt": "p", "reference": "r"}, {"prompt": "p", "reference": "r", "image": "a.png"}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(TINY, ["model.family=llama", f"data.path={data}"])
    with pytest.raises(ValueError, match=r"d.jsonl row 2 has images"):
        check_runnable(cfg, world_size=1)
    data.write_text("".join(json.dumps(dict(r, image=None)) + "\n" for r in rows) + "{torn\n")
    check_runnable(cfg, world_size=1)  # null images and a malformed row (the reader skips it): fine
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["p", "q"], "reference": ["r", "s"], "images": [None, ["x.png"]]}),
                   str(tmp_path / "d.parquet"))
    cfg = load_config(TINY, ["model.family=qwen2", f"data.path={tmp_path / 'd.parquet'}"])
    with pytest.raises(ValueError, match="has an image column 'images'"):
        check_runnable(cfg, world_size=1)
    with pytest.raises(ValueError, match="data.path = .*nope.jsonl"):
        check_runnable(load_config(TINY, ["model.family=qwen2", f"data.path={tmp_path / 'nope.jsonl'}"]), 1)


def test_good_layouts_pass():
    check_runnable(load_config(TINY, ["parallel.tp=2"]), world_size=4)
    check_runnable(load_config(TINY, []), world_size=1)


def test_overrides_read_yaml_1_2_numbers(tmp_path):
    tree = parse_overrides(["optim.lr=1e-6", "optim.min_lr=0", "x=1E+3", "y=-.5e1", "z=2", "w=v1e3"])
    assert tree["optim"] == {"lr": 1e-6, "min_lr": 0} and isinstance(tree["optim"]["lr"], float)
    assert (tree["x"], tree["y"], tree["z"], tree["w"]) == (1000.0, -5.0, 2, "v1e3")
    assert isinstance(tree["z"], int)
    assert load_config(TINY, ["optim.lr=1e30"]).optim.lr == 1e30  # in range (lr >= 0)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lr: 2e-5\n")
    assert load_config(str(cfg)).optim.lr == 2e-5  # the file reads numbers the same way
    import yaml

    assert yaml.safe_load("1e-6") == "1e-6"  # PyYAML's own loader is left as it was


def test_plot_skips_a_torn_last_line_with_a_warning(tmp_path, capsys):
    from megatron_rcpa.train.metrics_log import read_metrics, truncate_metrics
    from megatron_rcpa.train.plot import main as plot_main

    run = tmp_path / "run"
    run.mkdir()
    good = [{"step": s, "reward": 0.1 * s, "phase_name": "pre_alignment"} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good) + '{"step": 4, "rew')
    assert plot_main([str(run)]) == 0
    assert "skipped a torn last line" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(str(run))] == [1, 2, 3]
    # a bad line in the middle is not a kill's doing: an error naming it
    (run / "metrics.jsonl").write_text(json.dumps(good[0]) + "\nnot json\n" + json.dumps(good[1]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON metrics row"):
        read_metrics(str(run))
    # resuming at step 2 drops rows after it and the torn line
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good) + '{"step": 4, "rew')
    assert truncate_metrics(str(run / "metrics.jsonl"), 2) == 2
    assert [r["step"] for r in read_metrics(str(run))] == [1, 2]
    assert truncate_metrics(str(run / "metrics.jsonl"), 2) == 0
