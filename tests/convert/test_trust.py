"""Trust and failure, without a megatron process: the metadata allow-list, manifests, asset names, remote code,
outputs that would destroy their input, and the one-line description of any tool failure."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import warnings

import pytest
import torch

from megatron_rcpa.convert.checkpoint import CheckpointMetadata, read_metadata, refuse_overlap
from megatron_rcpa.convert.cli import run_cli
from megatron_rcpa.convert.errors import ConversionError
from megatron_rcpa.convert.hf_io import check_asset_name, copy_assets, load_hf_config, read_config_dict
from megatron_rcpa.convert.manifest import MANIFEST_FILE, check_manifest, write_manifest
from megatron_rcpa.convert.safe_metadata import (
    UnsafeCheckpointError,
    check_dcp_metadata,
    load_metadata_file,
    restricted_metadata,
)
from megatron_rcpa.testing.hostile import RunsCommand as _RunsCommand


@pytest.fixture(autouse=True)
def _keep_environment(monkeypatch):
    """run_cli sets PYTHONWARNINGS for the workers it spawns; keep it out of the other tests' environment."""
    monkeypatch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", "default"))




class _Eval:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


class _Persistent(pickle.Pickler):
    def persistent_id(self, obj):
        return "storage" if isinstance(obj, bytes) else None


def _hostile_payloads(marker):
    """(what, bytes) of pickles a checkpoint reader must refuse."""
    import io

    nested = {"state_dict_metadata": {"w": _RunsCommand(f"touch {marker}")}}  # buried inside plain containers
    buf = io.BytesIO()
    _Persistent(buf).dump({"x": b"payload"})
    return [
        ("os.system", pickle.dumps(_RunsCommand(f"touch {marker}"))),
        ("nested os.system", pickle.dumps(nested)),
        ("builtins.eval", pickle.dumps(_Eval())),
        ("protocol 0 os.system", pickle.dumps(_RunsCommand(f"touch {marker}"), protocol=0)),
        ("persistent id", buf.getvalue()),
    ]


@pytest.fixture
def dcp_dir(tmp_path):
    """A real torch.distributed.checkpoint directory (tensors of several dtypes + a bytes object)."""
    import torch.distributed.checkpoint as dcp

    state = {"a": torch.zeros(3, 4, dtype=torch.bfloat16), "b": torch.ones(2), "c": torch.arange(3),
             "obj": {"x": 1, "y": "text"}}
    path = tmp_path / "dcp"
    with pytest.warns(UserWarning):  # no process group: torch says it saves as one process
        dcp.save(state, checkpoint_id=str(path), no_dist=True)
    return path


def test_real_dcp_metadata_passes_the_allow_list(dcp_dir):
    meta = check_dcp_metadata(str(dcp_dir))
    assert set(meta.state_dict_metadata) >= {"a", "b", "c"}
    assert meta.state_dict_metadata["a"].properties.dtype == torch.bfloat16
    with restricted_metadata():  # torch's own reader, through the allow-list
        from torch.distributed.checkpoint import FileSystemReader

        assert FileSystemReader(str(dcp_dir)).read_metadata().state_dict_metadata.keys() == \
            meta.state_dict_metadata.keys()


@pytest.mark.parametrize("index", range(5))
def test_hostile_metadata_is_refused_and_never_run(dcp_dir, tmp_path, index):
    marker = tmp_path / "PWNED"
    what, payload = _hostile_payloads(marker)[index]
    (dcp_dir / ".metadata").write_bytes(payload)
    with pytest.raises(UnsafeCheckpointError) as info:
        check_dcp_metadata(str(dcp_dir))
    message = str(info.value)
    assert str(dcp_dir / ".metadata") in message, what
    assert "persistent" in message if what == "persistent id" else "not a checkpoint-metadata class" in message
    if "os.system" in what:
        assert "posix.system" in message or "os.system" in message
    if what == "builtins.eval":
        assert "builtins.eval" in message
    from torch.distributed.checkpoint import FileSystemReader

    with restricted_metadata(), pytest.raises(UnsafeCheckpointError):
        FileSystemReader(str(dcp_dir)).read_metadata()
    assert not marker.exists()


def test_restricted_metadata_is_reentrant_and_restores_pickle(dcp_dir):
    from torch.distributed.checkpoint import filesystem

    with restricted_metadata():
        with restricted_metadata():
            assert filesystem.pickle is not pickle
        assert filesystem.pickle is not pickle
        assert filesystem.pickle.dumps is pickle.dumps  # saves are unaffected
    assert filesystem.pickle is pickle
    with pytest.raises(RuntimeError, match="boom"), restricted_metadata():
        raise RuntimeError("boom")
    assert filesystem.pickle is pickle


def test_damaged_metadata_is_a_conversion_error(dcp_dir):
    path = dcp_dir / ".metadata"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ConversionError, match="cannot read checkpoint metadata .*truncated or corrupted"):
        check_dcp_metadata(str(dcp_dir))
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(ConversionError, match="cannot read checkpoint metadata"):
        load_metadata_file(str(path))
    path.unlink()
    with pytest.raises(ConversionError, match="not found"):
        check_dcp_metadata(str(dcp_dir))


# ------------------------------------------------------------------------------------------------ manifest
def test_manifest_sizes_always_checksums_on_request(dcp_dir):
    write_manifest(str(dcp_dir))
    files = json.loads((dcp_dir / MANIFEST_FILE).read_text())["files"]
    assert ".metadata" in files and any(f.endswith(".distcp") for f in files)
    assert check_manifest(str(dcp_dir), checksums=True) is True

    distcp = next(dcp_dir / f for f in files if f.endswith(".distcp"))
    data = bytearray(distcp.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte: same size
    distcp.write_bytes(bytes(data))
    assert check_manifest(str(dcp_dir)) is True  # sizes only: not seen
    with pytest.raises(ConversionError, match=rf"{distcp}: sha256 .* differs .*corrupted"):
        check_manifest(str(dcp_dir), checksums=True)

    distcp.write_bytes(bytes(data[:-10]))  # truncated: found without checksums
    with pytest.raises(ConversionError, match=rf"{distcp} has {len(data) - 10} bytes but the checkpoint was "
                                              rf"written with {len(data)} \(truncated"):
        check_manifest(str(dcp_dir))
    distcp.unlink()
    with pytest.raises(ConversionError, match=rf"{distcp} is missing"):
        check_manifest(str(dcp_dir))


def test_manifest_absent_warns_and_bad_manifest_is_refused(dcp_dir):
    with pytest.warns(UserWarning, match="has no rcpa_manifest.json .*loading it unchecked"):
        assert check_manifest(str(dcp_dir)) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_manifest(str(dcp_dir)) is False  # said once per directory
    with pytest.raises(ConversionError, match="has no rcpa_manifest.json"):
        check_manifest(str(dcp_dir), required=True)
    (dcp_dir / MANIFEST_FILE).write_text(json.dumps({"files": {"../../etc/passwd": {"size": 1, "sha256": "x"}}}))
    with pytest.raises(ConversionError, match="not a path inside"):
        check_manifest(str(dcp_dir))
    (dcp_dir / MANIFEST_FILE).write_text("{")
    with pytest.raises(ConversionError, match="cannot read the manifest"):
        check_manifest(str(dcp_dir))


# -------------------------------------------------------------------------------------------------- assets
@pytest.mark.parametrize("name", ["../.bashrc", "/etc/passwd", "..", ".", "", "sub/tokenizer.json",
                                  "..\\x.json", "a\0b", 5, None])
def test_asset_names_must_be_plain(name):
    with pytest.raises(ConversionError, match="is not a plain file name"):
        check_asset_name(name, "rcpa_checkpoint.json")


def _metadata_dir(tmp_path, **changes):
    meta = CheckpointMetadata(family="qwen2_5_vl", hf_config={"model_type": "qwen2_5_vl"}, dtype="fp32",
                              vocab_size=10, padded_vocab_size=128, assets=["tokenizer.json"])
    data = json.loads(meta.to_json())
    data.update(changes)
    path = tmp_path / "ckpt"
    (path / "model").mkdir(parents=True)
    (path / "rcpa_checkpoint.json").write_text(json.dumps(data))
    return path


def test_metadata_with_escaping_asset_names_is_refused(tmp_path):
    path = _metadata_dir(tmp_path, assets=["tokenizer.json", "../.bashrc"])
    with pytest.raises(ConversionError, match=r"rcpa_checkpoint.json: asset '../.bashrc' is not a plain file name"):
        read_metadata(str(path))
    path = _metadata_dir(tmp_path / "2", assets="tokenizer.json")
    with pytest.raises(ConversionError, match="'assets' must be a list"):
        read_metadata(str(path))


def test_symlinked_assets_are_not_copied(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (src / "tokenizer.json").write_text("{}")
    os.symlink(secret, src / "tokenizer_config.json")
    with pytest.raises(ConversionError, match=r"tokenizer_config.json is a symbolic link"):
        copy_assets(str(src), str(dst))
    assert not (dst / "tokenizer_config.json").exists()


# ---------------------------------------------------------------------------------------------- remote code
def test_auto_map_is_refused(tmp_path):
    from megatron_rcpa.models.tiny import save_tiny_qwen2_5_vl

    path = save_tiny_qwen2_5_vl(str(tmp_path / "hf"))
    config = json.loads(open(os.path.join(path, "config.json")).read())
    assert isinstance(load_hf_config(path), object)
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ConversionError, match=r"config.json has 'auto_map' .*trust_remote_code=False"):
        read_config_dict(path)
    with pytest.raises(ConversionError, match="auto_map"):
        load_hf_config(path)
    with pytest.raises(ConversionError, match="auto_map"):
        load_hf_config(config)
    del config["auto_map"]
    config["vision_config"]["auto_map"] = {"AutoConfig": "x.Y"}
    with pytest.raises(ConversionError, match="'vision_config.auto_map'"):
        load_hf_config(config)
    del config["vision_config"]["auto_map"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    tok_config = json.loads(open(os.path.join(path, "tokenizer_config.json")).read())
    tok_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tok_config, f)
    with pytest.raises(ConversionError, match=r"tokenizer_config.json has 'auto_map'"):
        copy_assets(path, str(tmp_path / "assets"))
    assert not (tmp_path / "assets").exists()


# ------------------------------------------------------------------------------------------ output vs input
def test_outputs_that_would_destroy_the_input_are_refused(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    os.symlink(src, tmp_path / "alias")
    for out, problem in [(src, "is"), (tmp_path / "alias", "is"), (src / "sub" / "out", "is inside"),
                         (tmp_path, "contains"), (str(src) + "/", "is")]:
        with pytest.raises(ConversionError, match=f"{problem} the input"):
            refuse_overlap(str(src), str(out))
    (tmp_path / "x.incomplete").mkdir()
    with pytest.raises(ConversionError, match="is the input"):  # the temporary output would be removed
        refuse_overlap(str(tmp_path / "x.incomplete"), str(tmp_path / "x"))
    refuse_overlap(str(src), str(tmp_path / "elsewhere"))
    refuse_overlap(str(src), str(tmp_path / "in2"))  # a common prefix is not containment


# ------------------------------------------------------------------------------------------- tool failures
def _one_line(capsys):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and len([ln for ln in lines if ln.startswith("error: ")]) == 1, err
    return next(ln for ln in lines if ln.startswith("error: "))


@pytest.mark.parametrize("exc, expected", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/out.incomplete/model-00001.safetensors"),
     "error: no space left on device (/data/out.incomplete/model-00001.safetensors)"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/out"), "error: permission denied (/data/out)"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"), "error: Read-only file system (/ro/x)"),
    (ConversionError("tensor 'x' is missing"), "error: tensor 'x' is missing"),
    (ValueError("unsupported dtype 'fp64'"), "error: ValueError: unsupported dtype 'fp64'"),
    (KeyError("layers"), "error: KeyError: 'layers'"),
])
def test_run_cli_prints_one_error_line_and_exits_2(exc, expected, capsys):
    def body():
        raise exc

    assert run_cli(body) == 2
    assert _one_line(capsys) == expected


@pytest.mark.megatron
def test_run_cli_describes_wrapped_and_worker_failures(capsys):
    from megatron.core.dist_checkpointing.core import CheckpointingException

    from megatron_rcpa.testing.launcher import DistributedWorkerError

    def megatron():
        raise CheckpointingException("Object shard .../common.pt not found")

    assert run_cli(megatron) == 2
    assert _one_line(capsys) == "error: megatron checkpoint error: Object shard .../common.pt not found"

    def wrapped_enospc():
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/d/__0_0.distcp")
        except OSError as exc:
            raise RuntimeError("save failed") from exc

    assert run_cli(wrapped_enospc) == 2
    assert _one_line(capsys) == "error: no space left on device (/d/__0_0.distcp)"

    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    def dcp_failure():
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/d/__1_0.distcp")
        except OSError as exc:
            raise CheckpointException("save failed", {1: _wrap_exception(exc)}) from None

    assert run_cli(dcp_failure) == 2  # torch's CheckpointException is a BaseException
    assert _one_line(capsys) == "error: no space left on device (/d/__1_0.distcp)"

    def dcp_other():
        try:
            raise AssertionError("metadata is None")
        except AssertionError as exc:
            raise CheckpointException("load failed", {0: _wrap_exception(exc)}) from None

    assert run_cli(dcp_other) == 2
    assert _one_line(capsys) == "error: checkpoint AssertionError: metadata is None (on rank 0)"

    worker_tb = ('Traceback (most recent call last):\n  File "x.py", line 1, in f\n    g()\n'
                 "OSError: [Errno 28] No space left on device: '/d/out.incomplete/stage000-part00000.safetensors'\n")
    conversion_tb = ('Traceback (most recent call last):\n  File "x.py", line 1, in f\n'
                     "megatron_rcpa.convert.safe_metadata.UnsafeCheckpointError: refusing to load /c/.metadata: "
                     "it asks for posix.system\n")
    for tb, expected in [(worker_tb, "error: no space left on device "
                                     "(/d/out.incomplete/stage000-part00000.safetensors) (on rank 1)"),
                         (conversion_tb, "error: refusing to load /c/.metadata: it asks for posix.system")]:
        def worker(tb=tb):
            raise DistributedWorkerError(1, {1: tb}, 2)

        assert run_cli(worker) == 2
        assert _one_line(capsys) == expected


def test_traceback_on_request(capsys, monkeypatch):
    monkeypatch.setenv("RCPA_TRACEBACK", "1")

    def body():
        raise ValueError("x")

    assert run_cli(body) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("error: ValueError: x")


def test_copy_assets_into_a_full_disk_names_the_file(tmp_path, capsys, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")

    def full(a, b, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(b))

    monkeypatch.setattr(shutil, "copyfile", full)
    assert run_cli(lambda: copy_assets(str(src), str(tmp_path / "dst")) and 0) == 2
    assert _one_line(capsys) == f"error: no space left on device ({tmp_path / 'dst' / 'tokenizer.json'})"
