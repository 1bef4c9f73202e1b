"""3-D (MRoPE) position ids for Qwen2-VL-style models, batched, in plain torch (no megatron import).

Qwen2.5-VL rotates each attention head with three position streams (temporal, height, width) whose rotary
frequencies are split by ``mrope_section``. :func:`mrope_position_ids` computes those streams from the
token ids and the images' ``image_grid_thw`` exactly as ``transformers`` (5.x) ``get_rope_index`` does:

* a text token takes the running position ``p`` in all three streams and advances it by 1;
* an image of patch grid ``(t, h, w)`` occupies ``t * (h/m) * (w/m)`` tokens (``m`` = spatial merge size)
  that all start at the running position ``p``: token ``(ti, hi, wi)`` gets ``(p + ti, p + hi, p + wi)``;
  the running position then advances by ``max(h, w) / m``;
* with an ``attention_mask`` only the unmasked tokens are counted and masked tokens get position 0.

Images are consumed in order, row after row (``image_grid_thw`` lists every image of the batch, as the HF
processor produces it). Unlike transformers, the computation is vectorised over the batch (no Python loop
over rows or groups).

For decoding, the next token of row ``b`` takes position ``max(position_ids[:, b]) + 1`` in all three
streams (transformers' ``rope_deltas``): see :func:`next_positions`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["mrope_position_ids", "next_positions", "text_position_ids"]


def text_position_ids(batch_size: int, seq_len: int, *, start: Optional[torch.Tensor] = None,
                      device=None) -> torch.Tensor:
    """[3, B, S] positions of a text-only continuation: ``start[b] + arange(S)`` in all three streams."""
    pos = torch.arange(seq_len, device=device, dtype=torch.long).view(1, 1, seq_len).expand(3, batch_size, seq_len)
    if start is not None:
        pos = pos + start.to(device=pos.device, dtype=torch.long).view(1, batch_size, 1)
    return pos.contiguous()


def next_positions(position_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B] position the next generated token takes: one past the largest position of the row (all streams)."""
    pos = position_ids
    if attention_mask is not None:
        pos = pos.masked_fill(~attention_mask.bool().unsqueeze(0), 0)
    return pos.amax(dim=(0, 2)) + 1


def mrope_position_ids(
    input_ids: torch.Tensor,
    image_grid_thw: Optional[torch.Tensor] = None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
    attention_mask: Optional[torch.Tensor] = None,
    video_token_id: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """3-D rotary position ids for a batch of token ids with images.

    Args:
        input_ids: [B, S] token ids; every image is a run of ``image_token_id`` tokens.
        image_grid_thw: [N, 3] patch grid (t, h, w) of each image of the batch, in order; None if no images.
        image_token_id: id of the image placeholder token.
        spatial_merge_size: the vision tower's patch-merge factor (2 for Qwen2.5-VL).
        attention_mask: optional [B, S] (1 = token, 0 = padding).
        video_token_id: if given, its presence raises (videos are not supported).

    Returns:
        ``(position_ids, rope_deltas)``: [3, B, S] long, and [B] long ``max position + 1 - number of tokens``
        (the offset transformers adds to a text position during decoding).

    Raises:
        ValueError: the number of image tokens does not match ``image_grid_thw``, or an image's tokens span
            two rows, or the grid is not divisible by ``spatial_merge_size``.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    batch, seq = input_ids.shape
    device = input_ids.device
    valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
             else attention_mask.to(device=device).bool())
    if valid.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(valid.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if video_token_id is not None and bool(((input_ids == video_token_id) & valid).any()):
        raise ValueError(f"input_ids contain video tokens (id {video_token_id}); videos are not supported")

    is_image = (input_ids == image_token_id) & valid
    num_image_tokens = int(is_image.sum())
    inc = valid.long()  # how far each token advances the running position

    if image_grid_thw is None or image_grid_thw.numel() == 0:
        if num_image_tokens:
            raise ValueError(f"input_ids hold {num_image_tokens} image tokens (id {image_token_id}) but no "
                             "image_grid_thw was given")
        start = torch.cumsum(inc, dim=1) - inc
        position_ids = start.unsqueeze(0).expand(3, batch, seq).masked_fill(~valid.unsqueeze(0), 0)
    else:
        grid = image_grid_thw.to(device=device, dtype=torch.long).reshape(-1, 3)
        m = int(spatial_merge_size)
        if bool(((grid[:, 1] % m) != 0).any() or ((grid[:, 2] % m) != 0).any()):
            raise ValueError(f"image_grid_thw {grid.tolist()} has an h or w not divisible by spatial_merge_size={m}")
        gt, gh, gw = grid[:, 0], grid[:, 1] // m, grid[:, 2] // m
        counts = gt * gh * gw
        total = int(counts.sum())
        if total != num_image_tokens:
            raise ValueError(f"input_ids hold {num_image_tokens} image tokens (id {image_token_id}) but "
                             f"image_grid_thw {grid.tolist()} describes {total} (t*h*w/{m * m} per image)")
        ends = torch.cumsum(counts, dim=0)
        starts = ends - counts
        flat_image = is_image.reshape(-1)
        flat_rows = torch.arange(batch, device=device).repeat_interleave(seq)[flat_image]
        order = torch.arange(num_image_tokens, device=device)  # index of each image token, batch-major
        which = torch.searchsorted(ends, order, right=True)  # the image each token belongs to
        k = order - starts[which]  # index of the token inside its image
        if num_image_tokens and bool((flat_rows[starts[counts > 0]] != flat_rows[ends[counts > 0] - 1]).any()):
            raise ValueError("an image's tokens span two rows of input_ids; check image_grid_thw order/sizes")
        # The last token of an image advances the running position by max(h, w); the others by nothing.
        advance = torch.where(k == counts[which] - 1, torch.maximum(gh, gw)[which], torch.zeros_like(k))
        inc = inc.reshape(-1).clone()
        inc[flat_image] = advance
        inc = inc.view(batch, seq)
        start = torch.cumsum(inc, dim=1) - inc  # running position before each token (= image start for images)
        position_ids = start.unsqueeze(0).expand(3, batch, seq).clone()
        hw = (gh * gw)[which]
        w_of = gw[which]
        image_start = start.reshape(-1)[flat_image]
        offsets = torch.stack([k // hw, (k % hw) // w_of, k % w_of])  # (t, h, w) index of each image token
        position_ids.view(3, -1)[:, flat_image] = image_start.unsqueeze(0) + offsets
        position_ids = position_ids.masked_fill(~valid.unsqueeze(0), 0)

    max_pos = position_ids.masked_fill(~valid.unsqueeze(0), -1).amax(dim=(0, 2))
    rope_deltas = max_pos + 1 - valid.sum(dim=1)
    return position_ids.contiguous(), rope_deltas
