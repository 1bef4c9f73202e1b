"""MRoPE 3-D position ids: ours (batched torch) == transformers' get_rope_index (per-row Python loop)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rcpa.models.mrope import mrope_position_ids, next_positions, text_position_ids

MERGE = 2


@pytest.fixture(scope="module")
def hf_vl():
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_rcpa.models.tiny import tiny_qwen2_5_vl_config

    return Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(num_layers=1, vision_depth=1)).model


def _row(config, parts, pad_left=0, pad_id=5):
    """parts: ints (text lengths) and (t, h, w) image grids -> token ids, and the grids in order."""
    ids, grids = [pad_id] * pad_left, []
    for part in parts:
        if isinstance(part, tuple):
            t, h, w = part
            ids += [config.vision_start_token_id] + [config.image_token_id] * (t * h * w // MERGE**2)
            ids += [config.vision_end_token_id]
            grids.append(list(part))
        else:
            ids += [7 + (i * 13) % 200 for i in range(part)]
    return ids, grids


def _batch(config, rows, pads):
    built = [_row(config, parts, pad) for parts, pad in zip(rows, pads)]
    length = max(len(ids) for ids, _ in built)
    input_ids = torch.full((len(rows), length), 5, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (ids, _) in enumerate(built):
        input_ids[i, length - len(ids):] = torch.tensor(ids)  # left padding
        mask[i, length - len(ids):] = 1
        mask[i, length - len(ids): length - len(ids) + pads[i]] = 0  # explicit pad tokens
    grids = [g for _, gs in built for g in gs]
    grid = torch.tensor(grids, dtype=torch.long) if grids else None
    return input_ids, mask, grid


def _compare(hf_vl, input_ids, mask, grid):
    config = hf_vl.config
    ref, ref_delta = hf_vl.get_rope_index(input_ids, mm_token_type_ids=(input_ids == config.image_token_id).int(),
                                          image_grid_thw=grid, attention_mask=mask)
    ours, delta = mrope_position_ids(input_ids, grid, image_token_id=config.image_token_id,
                                     spatial_merge_size=MERGE, attention_mask=mask)
    assert torch.equal(ours, ref)
    assert torch.equal(delta, ref_delta.view(-1))
    # the next token goes one past the row's largest position (transformers: cache_len + rope_delta)
    valid = mask.sum(dim=1) if mask is not None else torch.full((input_ids.shape[0],), input_ids.shape[1])
    assert torch.equal(next_positions(ours, mask), valid + delta)


def test_image_text_batch_with_text_only_row_and_two_images(hf_vl):
    rows = [[3, (1, 4, 6), 5], [2, (1, 2, 2), 1, (1, 6, 4), 3], [9]]
    for pads in ([0, 0, 0], [2, 0, 1]):
        input_ids, mask, grid = _batch(hf_vl.config, rows, pads)
        _compare(hf_vl, input_ids, mask, grid)
        _compare(hf_vl, input_ids, None, grid)


@settings(max_examples=40, deadline=None)
@given(st.lists(
    st.tuples(
        st.lists(st.one_of(st.integers(1, 5),
                           st.tuples(st.integers(1, 2), st.sampled_from([2, 4, 6]), st.sampled_from([2, 4, 6]))),
                 min_size=1, max_size=4),
        st.integers(0, 3)),
    min_size=1, max_size=3))
def test_random_layouts_match_transformers(hf_vl, rows):
    input_ids, mask, grid = _batch(hf_vl.config, [r for r, _ in rows], [p for _, p in rows])
    _compare(hf_vl, input_ids, mask, grid)


def test_text_positions_and_errors(hf_vl):
    config = hf_vl.config
    pos = text_position_ids(2, 3, start=torch.tensor([4, 10]))
    assert pos.shape == (3, 2, 3) and pos[:, 1].tolist() == [[10, 11, 12]] * 3
    input_ids, _, grid = _batch(config, [[2, (1, 4, 4), 2]], [0])
    kwargs = dict(image_token_id=config.image_token_id, spatial_merge_size=MERGE)
    with pytest.raises(ValueError, match="4 image tokens .* describes 6"):
        mrope_position_ids(input_ids, torch.tensor([[1, 4, 6]]), **kwargs)
    with pytest.raises(ValueError, match="no image_grid_thw"):
        mrope_position_ids(input_ids, None, **kwargs)
    with pytest.raises(ValueError, match="not divisible by spatial_merge_size"):
        mrope_position_ids(input_ids, torch.tensor([[1, 3, 4]]), **kwargs)
    with pytest.raises(ValueError, match="video"):
        mrope_position_ids(input_ids.clone().fill_(config.video_token_id), None,
                           video_token_id=config.video_token_id, **kwargs)
