"""The loaders themselves (not only the tools' up-front checks) under the metadata allow-list, on a TP=2 grid:
real checkpoints saved at TP=1 and TP=2 (policy, and an optimizer-style directory of tensors + objects loaded
as ``Trainer.load`` does) load; a planted ``.metadata`` is refused by ``load_checkpoint`` and by
``with restricted_metadata(): dist_checkpointing.load(...)``, and never runs."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch

from megatron_rcpa.convert.manifest import MANIFEST_FILE, write_manifest
from megatron_rcpa.testing.tools import run_tool

pytestmark = [pytest.mark.megatron, pytest.mark.multiproc]


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _save_sharded(sharded_state_dict, directory):
    """The trainer's synchronous sharded save (``save_sharded`` where the tree has it)."""
    try:
        from megatron_rcpa.convert.checkpoint import save_sharded
    except ImportError:  # a tree before save_sharded: megatron's writer needs _synchronous_writer in a worker
        from megatron.core import dist_checkpointing

        from megatron_rcpa.convert.checkpoint import _synchronous_writer

        with _synchronous_writer():
            dist_checkpointing.save(sharded_state_dict, directory)
        return
    save_sharded(sharded_state_dict, directory)


def _loaders_rank(ckpt: str, planted: str, work: str, marker: str):
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_rcpa.convert.checkpoint import build_policy_from_checkpoint, load_checkpoint, save_checkpoint
    from megatron_rcpa.convert.errors import ConversionError
    from megatron_rcpa.convert.safe_metadata import restricted_metadata

    rank = torch.distributed.get_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    out = {}
    policy, meta = build_policy_from_checkpoint(ckpt)  # saved at TP=1, loaded at TP=2
    tp2 = os.path.join(work, "tp2")
    save_checkpoint(policy, tp2, meta)  # saved at TP=2
    again, _ = build_policy_from_checkpoint(tp2)
    pairs = zip(policy.state_dict().values(), again.state_dict().values())
    out["tp2_round_trip"] = all(torch.equal(a, b) for a, b in pairs if isinstance(a, torch.Tensor))

    def optimizer_like():
        sd = policy.sharded_state_dict()
        sd["param_groups"] = ShardedObject("optimizer.param_groups", {"lr": 0.5, "step": 3}, (1,), (0,),
                                           replica_id=tp_rank)
        return sd

    opt_dir = os.path.join(work, "optimizer")
    if rank == 0:
        os.makedirs(opt_dir)
    torch.distributed.barrier()
    _save_sharded(optimizer_like(), opt_dir)
    torch.distributed.barrier()
    with restricted_metadata():
        loaded = dist_checkpointing.load(optimizer_like(), opt_dir)
    out["param_groups"] = loaded["param_groups"]

    torch.distributed.barrier()
    if rank == 0:
        with open(os.path.join(opt_dir, ".metadata"), "wb") as f:
            pickle.dump(_RunsCommand(f"touch {marker}"), f)
    torch.distributed.barrier()
    try:
        with restricted_metadata():
            dist_checkpointing.load(optimizer_like(), opt_dir)
        out["planted_optimizer"] = "loaded"
    except BaseException as exc:  # noqa: BLE001 - torch wraps it in CheckpointException (a BaseException)
        out["planted_optimizer"] = f"{type(exc).__name__}: {exc}"
    torch.distributed.barrier()
    try:
        load_checkpoint(policy, planted)
        out["planted_policy"] = "loaded"
    except ConversionError as exc:
        out["planted_policy"] = str(exc)
    out["marker"] = os.path.exists(marker)
    return out


def test_loaders_accept_real_checkpoints_and_refuse_planted_metadata(tmp_path):
    from megatron_rcpa.models.tiny import save_tiny_qwen2_5_vl
    from megatron_rcpa.testing.launcher import run_distributed

    hf = save_tiny_qwen2_5_vl(str(tmp_path / "hf"), seed=2)
    ckpt = tmp_path / "ckpt"
    rc, _, err = run_tool("convert_hf_to_megatron.py", "--hf-dir", hf, "--out", ckpt)
    assert rc == 0, err
    planted = tmp_path / "planted"
    shutil.copytree(ckpt, planted)
    marker = tmp_path / "PWNED"
    (planted / "model" / ".metadata").write_bytes(pickle.dumps(_RunsCommand(f"touch {marker}")))
    os.remove(planted / MANIFEST_FILE)
    write_manifest(str(planted))  # the attacker rewrote the manifest too: only the allow-list stands
    (tmp_path / "work").mkdir()

    results = run_distributed(_loaders_rank, world_size=2, tp=2,
                              args=(str(ckpt), str(planted), str(tmp_path / "work"), str(marker)), timeout=600)
    for r in results:
        assert r["tp2_round_trip"]
        assert r["param_groups"] == {"lr": 0.5, "step": 3}
        assert "posix.system" in r["planted_optimizer"] and ".metadata" in r["planted_optimizer"], r
        assert r["planted_policy"].startswith(f"refusing to load {planted / 'model' / '.metadata'}: it asks for "
                                              "posix.system"), r
        assert not r["marker"]
    assert not marker.exists()
