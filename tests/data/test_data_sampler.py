"""PromptSampler: determinism, exact resume, DP sharding, epochs, substitution of unloadable samples."""

import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from megatron_rcpa.data import PromptSampler, load_samples


def _drain(sampler, k):
    return [sampler.next_indices() for _ in range(k)]


def test_deterministic_and_seed_dependent():
    data = list(range(23))
    a = _drain(PromptSampler(data, 4, seed=3), 12)
    assert a == _drain(PromptSampler(data, 4, seed=3), 12)
    assert a != _drain(PromptSampler(data, 4, seed=4), 12)
    assert _drain(PromptSampler(data, 4, seed=3, shuffle=False), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_epochs_visit_every_index_once_and_drop_the_tail():
    s = PromptSampler(list(range(10)), 3, seed=0)
    assert s.batches_per_epoch == 3
    epoch0 = sum(_drain(s, 3), [])
    assert len(set(epoch0)) == 9 and s.epoch == 1 and s.cursor == 0  # one index of 10 dropped
    epoch1 = sum(_drain(s, 3), [])
    assert len(set(epoch1)) == 9 and epoch1 != epoch0  # a new order every epoch


def test_no_drop_last_completes_the_last_batch_from_the_epoch_start():
    s = PromptSampler(list(range(5)), 2, seed=0, shuffle=False, drop_last=False)
    assert s.batches_per_epoch == 3
    assert _drain(s, 4) == [[0, 1], [2, 3], [4, 0], [0, 1]]
    tiny = PromptSampler(list(range(2)), 3, shuffle=False, drop_last=False)
    assert tiny.next_indices() == [0, 1, 0]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(4, 40), bs=st.integers(1, 4), dp=st.integers(1, 3), k=st.integers(0, 30), seed=st.integers(0, 99),
       drop_last=st.booleans())
def test_state_dict_round_trip_gives_the_identical_next_batches(n, bs, dp, k, seed, drop_last):
    if drop_last and n < bs * dp:
        return
    data = [f"s{i}" for i in range(n)]
    for rank in range(dp):
        a = PromptSampler(data, bs, seed=seed, dp_rank=rank, dp_size=dp, drop_last=drop_last)
        for _ in range(k):
            a.next_batch()
        state = json.loads(json.dumps(a.state_dict()))  # checkpoints are plain data
        b = PromptSampler(data, bs, seed=seed, dp_rank=rank, dp_size=dp, drop_last=drop_last)
        b.load_state_dict(state)
        assert [b.next_batch() for _ in range(7)] == [a.next_batch() for _ in range(7)]
        assert b.state_dict() == a.state_dict()


def test_dp_sharding_is_disjoint_and_matches_the_global_batch():
    data = list(range(50))
    dp = 4
    samplers = [PromptSampler(data, 3, seed=7, dp_rank=r, dp_size=dp) for r in range(dp)]
    ref = PromptSampler(data, 3, seed=7, dp_rank=0, dp_size=dp)
    seen_epoch0 = []
    for _ in range(ref.batches_per_epoch):
        per_rank = [s.next_indices() for s in samplers]
        assert sum(per_rank, []) == ref.next_global_indices()  # rank-major blocks of the global batch
        flat = sum(per_rank, [])
        assert len(set(flat)) == len(flat)  # disjoint within a step
        seen_epoch0 += flat
    assert len(set(seen_epoch0)) == len(seen_epoch0) == 48  # and within an epoch


def test_resume_with_another_dp_layout_of_the_same_global_batch():
    data = list(range(30))
    a = PromptSampler(data, 4, seed=1, dp_rank=0, dp_size=2)
    _drain(a, 3)
    nxt = a.next_global_indices()
    b = PromptSampler(data, 8, seed=1)
    a2 = PromptSampler(data, 4, seed=1, dp_rank=0, dp_size=2)
    _drain(a2, 3)
    b.load_state_dict(a2.state_dict())
    assert b.next_indices() == nxt


def test_load_state_dict_rejects_a_different_run():
    s = PromptSampler(list(range(20)), 2, seed=1)
    state = s.state_dict()
    with pytest.raises(ValueError, match="seed = 1 in the checkpoint but 2 in this run"):
        PromptSampler(list(range(20)), 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples = 20 in the checkpoint but 21"):
        PromptSampler(list(range(21)), 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size = 2 in the checkpoint but 4"):
        PromptSampler(list(range(20)), 2, seed=1, dp_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="cursor = 99 out of range"):
        PromptSampler(list(range(20)), 2, seed=1).load_state_dict({**state, "cursor": 99})


def test_argument_errors():
    with pytest.raises(ValueError, match="batch_size"):
        PromptSampler([1, 2], 0)
    with pytest.raises(ValueError, match="dp_rank = 2"):
        PromptSampler([1, 2, 3, 4], 1, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="empty"):
        PromptSampler([], 1)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PromptSampler([1, 2, 3], 2, dp_size=2)


def test_iteration_yields_samples():
    s = PromptSampler(["a", "b", "c", "d"], 2, shuffle=False)
    it = iter(s)
    assert next(it) == ["a", "b"] and next(it) == ["c", "d"] and next(it) == ["a", "b"]
    assert s.batches_served == 3 and s.epoch == 1


def test_unloadable_sample_is_replaced_deterministically(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # passes the header check
    rows = [{"id": f"r{i}", "prompt": "p", "image": "cut.jpg" if i == 1 else "ok.png"} for i in range(4)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_samples(tmp_path / "d.jsonl")
    s = PromptSampler(ds, 2, shuffle=False)
    assert [x.id for x in s.next_batch()] == ["r0", "r2"]  # r1 replaced by the next loadable one
    assert s.unloadable == {1} and ds.stats.skipped["unreadable_image"] == 1
