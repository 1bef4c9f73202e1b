"""The conversion tools against hostile or damaged input, as a user runs them: planted pickles, corrupted and
truncated files, escaping asset names, symbolic links, remote code, outputs that would destroy their input,
and failures that are not bad input (full disk, permission denied, megatron errors, bad dtype). Every one
exits with 2 and prints exactly one ``error:`` line; nothing hostile runs and nothing is written outside --out.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import pickle
import shutil

import pytest
import torch

from megatron_rcpa.convert.manifest import MANIFEST_FILE, check_manifest, write_manifest
from megatron_rcpa.testing.hostile import RunsCommand as _RunsCommand
from megatron_rcpa.testing.tools import TOOLS, run_tool


@pytest.fixture(autouse=True)
def _keep_environment(monkeypatch):
    """run_cli sets PYTHONWARNINGS for the workers it spawns; keep it out of the other tests' environment."""
    monkeypatch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", "default"))




def _error_line(err):
    """The single ``error:`` line of a failed tool run (and no traceback)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _fails(rc, err, *needles):
    assert rc == 2, err
    line = _error_line(err)
    for needle in needles:
        assert str(needle) in line, line
    return line


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_rcpa.models.tiny import save_tiny_qwen2_5_vl

    return save_tiny_qwen2_5_vl(str(tmp_path_factory.mktemp("trust") / "hf"), seed=3)


@pytest.fixture(scope="module")
def ckpt(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trust_ckpt") / "megatron"
    rc, _, err = run_tool("convert_hf_to_megatron.py", "--hf-dir", hf_dir, "--out", out)
    assert rc == 0, err
    return out


@pytest.fixture
def copy(ckpt, tmp_path):
    """A fresh copy of the converted checkpoint to break."""
    path = tmp_path / "ckpt"
    shutil.copytree(ckpt, path)
    return path


def _distcp(path):
    return sorted((path / "model").glob("*.distcp"))[0]


def _plant(path, marker):
    """A pickle that would create ``marker`` as model/.metadata, with the manifest rewritten to match (an
    attacker who can write the checkpoint can write its manifest too)."""
    (path / "model" / ".metadata").write_bytes(pickle.dumps(_RunsCommand(f"touch {marker}")))
    os.remove(path / MANIFEST_FILE)
    write_manifest(str(path))


@pytest.mark.megatron
def test_planted_metadata_is_refused_by_the_tools(copy, hf_dir, tmp_path):
    marker = tmp_path / "PWNED"
    _plant(copy, marker)
    rc, _, err = run_tool("convert_megatron_to_hf.py", "--megatron-dir", copy, "--out", tmp_path / "out")
    _fails(rc, err, copy / "model" / ".metadata", "posix.system", "not a checkpoint-metadata class")
    rc, _, err = run_tool("verify_conversion.py", "--hf-dir", hf_dir, "--megatron-dir", copy)
    _fails(rc, err, copy / "model" / ".metadata", "posix.system")
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.megatron
def test_corrupted_and_truncated_files_are_found(copy, hf_dir, tmp_path):
    distcp = _distcp(copy)
    data = bytearray(distcp.read_bytes())
    data[len(data) // 2: len(data) // 2 + 8] = bytes(b ^ 0x55 for b in data[len(data) // 2: len(data) // 2 + 8])
    distcp.write_bytes(bytes(data))
    rc, _, err = run_tool("convert_megatron_to_hf.py", "--megatron-dir", copy, "--out", tmp_path / "out", "--verify")
    _fails(rc, err, distcp, "sha256", "corrupted")
    rc, _, err = run_tool("verify_conversion.py", "--hf-dir", hf_dir, "--megatron-dir", copy)  # always checksums
    _fails(rc, err, distcp, "corrupted")
    distcp.write_bytes(bytes(data[: len(data) // 2]))
    rc, _, err = run_tool("convert_megatron_to_hf.py", "--megatron-dir", copy, "--out", tmp_path / "out")
    _fails(rc, err, distcp, f"has {len(data) // 2} bytes but the checkpoint was written with {len(data)}")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.incomplete").exists()


@pytest.mark.megatron
def test_export_writes_a_manifest_and_an_old_checkpoint_still_loads(copy, hf_dir, tmp_path):
    os.remove(copy / MANIFEST_FILE)  # as written before manifests existed
    back = tmp_path / "back"
    rc, _, err = run_tool("convert_megatron_to_hf.py", "--megatron-dir", copy, "--out", back)
    assert rc == 0, err
    assert "has no rcpa_manifest.json" in err and "unchecked" in err
    assert check_manifest(str(back), checksums=True, required=True)
    files = json.loads((back / MANIFEST_FILE).read_text())["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)

    # the export is checked when it is converted again: sha256 with --verify, sizes always
    shard = back / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    rc, _, err = run_tool("convert_hf_to_megatron.py", "--hf-dir", back, "--out", tmp_path / "again", "--verify")
    _fails(rc, err, shard, "corrupted")
    shard.write_bytes(bytes(data[:-1]))
    rc, _, err = run_tool("convert_hf_to_megatron.py", "--hf-dir", back, "--out", tmp_path / "again")
    _fails(rc, err, shard, "truncated")
    assert not (tmp_path / "again").exists()


@pytest.mark.megatron
def test_assets_cannot_escape_or_follow_links(copy, hf_dir, tmp_path):
    out = tmp_path / "out" / "hf"
    meta = json.loads((copy / "rcpa_checkpoint.json").read_text())
    meta["assets"].append("../.bashrc")
    (copy / "rcpa_checkpoint.json").write_text(json.dumps(meta))
    (copy / ".bashrc").write_text("echo hi")  # what "hf_assets/../.bashrc" would have copied
    rc, _, err = run_tool("convert_megatron_to_hf.py", "--megatron-dir", copy, "--out", out)
    _fails(rc, err, "asset '../.bashrc' is not a plain file name")
    assert not (tmp_path / "out" / ".bashrc").exists() and not out.exists()

    meta["assets"].remove("../.bashrc")
    (copy / "rcpa_checkpoint.json").write_text(json.dumps(meta))
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    os.remove(copy / "hf_assets" / "tokenizer.json")
    os.symlink(secret, copy / "hf_assets" / "tokenizer.json")
    rc, _, err = run_tool("convert_megatron_to_hf.py", "--megatron-dir", copy, "--out", out)
    _fails(rc, err, "tokenizer.json", "symbolic link")
    os.remove(copy / MANIFEST_FILE)  # without a manifest the export itself refuses the link
    rc, _, err = run_tool("convert_megatron_to_hf.py", "--megatron-dir", copy, "--out", out)
    _fails(rc, err, "tokenizer.json", "symbolic link")
    assert not out.exists()

    linked = tmp_path / "hf_linked"
    shutil.copytree(hf_dir, linked)
    os.remove(linked / "tokenizer.json")
    os.symlink(secret, linked / "tokenizer.json")
    rc, _, err = run_tool("convert_hf_to_megatron.py", "--hf-dir", linked, "--out", tmp_path / "m")
    _fails(rc, err, linked / "tokenizer.json", "symbolic link")
    assert not (tmp_path / "m").exists()


def test_remote_code_is_refused(hf_dir, tmp_path):
    evil = tmp_path / "hf_remote"
    shutil.copytree(hf_dir, evil)
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModel": "modeling_evil.EvilModel"}
    (evil / "config.json").write_text(json.dumps(config))
    (evil / "configuration_evil.py").write_text(f"open({str(tmp_path / 'PWNED')!r}, 'w')\n")
    rc, _, err = run_tool("convert_hf_to_megatron.py", "--hf-dir", evil, "--out", tmp_path / "m")
    _fails(rc, err, evil / "config.json", "auto_map", "trust_remote_code=False")
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "m").exists()


@pytest.mark.megatron
def test_an_output_that_is_or_holds_the_input_is_refused(copy, hf_dir, tmp_path):
    before = sorted(p.name for p in copy.rglob("*"))
    os.symlink(copy, tmp_path / "alias")
    for out in (copy, tmp_path / "alias", copy / "model", tmp_path):
        rc, _, err = run_tool("convert_megatron_to_hf.py", "--megatron-dir", copy, "--out", out, "--overwrite")
        _fails(rc, err, "would destroy the input")
    for out in (hf_dir, os.path.join(hf_dir, "sub"), os.path.dirname(hf_dir)):
        rc, _, err = run_tool("convert_hf_to_megatron.py", "--hf-dir", hf_dir, "--out", out, "--overwrite")
        _fails(rc, err, "would destroy the input")
    assert sorted(p.name for p in copy.rglob("*")) == before
    assert check_manifest(str(copy), checksums=True, required=True)
    assert os.path.isfile(os.path.join(hf_dir, "model.safetensors"))


@pytest.mark.megatron
def test_megatron_errors_and_bad_dtypes_are_one_line(copy, tmp_path):
    meta = json.loads((copy / "rcpa_checkpoint.json").read_text())
    meta["source_dtype"] = "fp64"
    (copy / "rcpa_checkpoint.json").write_text(json.dumps(meta))
    os.remove(copy / MANIFEST_FILE)
    rc, _, err = run_tool("convert_megatron_to_hf.py", "--megatron-dir", copy, "--out", tmp_path / "out")
    _fails(rc, err, "unsupported dtype 'fp64'")
    meta["source_dtype"] = "bf16"
    meta["dtype"] = "int8"
    (copy / "rcpa_checkpoint.json").write_text(json.dumps(meta))
    rc, _, err = run_tool("convert_megatron_to_hf.py", "--megatron-dir", copy, "--out", tmp_path / "out")
    _fails(rc, err, "unsupported dtype 'int8'")
    meta["dtype"] = "fp32"
    (copy / "rcpa_checkpoint.json").write_text(json.dumps(meta))
    os.remove(copy / "model" / "metadata.json")  # megatron's own marker of a dist checkpoint
    rc, _, err = run_tool("convert_megatron_to_hf.py", "--megatron-dir", copy, "--out", tmp_path / "out")
    _fails(rc, err)
    assert not (tmp_path / "out").exists()


def _tool_main(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", os.path.join(TOOLS, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.megatron
def test_disk_full_and_permission_denied_in_the_tools(ckpt, hf_dir, tmp_path, monkeypatch, capsys):
    from megatron_rcpa.convert import megatron_to_hf

    out = tmp_path / "out"

    def full(self, name, tensor):  # the export's writer streams each tensor to its part file: the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device", self.data_path)

    monkeypatch.setattr(megatron_to_hf._PartWriter, "add", full)
    assert _tool_main("convert_megatron_to_hf.py")(["--megatron-dir", str(ckpt), "--out", str(out)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"error: no space left on device ({out}.incomplete/stage000-part00000.safetensors")
    assert not out.exists() and not os.path.exists(f"{out}.incomplete")
    monkeypatch.undo()

    real_makedirs = os.makedirs

    def denied(path, *args, **kwargs):
        if str(path).startswith(str(out)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", denied)
    assert _tool_main("convert_hf_to_megatron.py")(["--hf-dir", hf_dir, "--out", str(out)]) == 2
    assert _error_line(capsys.readouterr().err) == f"error: permission denied ({out}.incomplete/model)"
    assert _tool_main("convert_megatron_to_hf.py")(["--megatron-dir", str(ckpt), "--out", str(out)]) == 2
    assert _error_line(capsys.readouterr().err) == f"error: permission denied ({out}.incomplete)"
    assert not out.exists()
    assert not torch.distributed.is_initialized()
