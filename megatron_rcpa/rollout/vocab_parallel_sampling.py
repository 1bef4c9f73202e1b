"""Sampling one token per row from vocab-parallel logits WITHOUT gathering them (top-p = 1 only).

:func:`~megatron_rcpa.rollout.sampling.sample_next_tokens` all-gathers the last position's logits
(``[B, V]`` per step: 155 MB at B = 256, V = 152k in fp32) and calls ``torch.multinomial``. For top-p = 1 the
same draw needs only ``[B]``-sized collectives: ``multinomial`` draws one exponential ``E_j`` per
vocabulary entry and returns ``argmax_j p_j / E_j`` (the Gumbel-max trick), and
``argmax_j p_j / E_j = argmax_j (x_j / T - log E_j)``, a maximum that each TP rank can take over its own
shard. So every rank draws the same ``[B, vocab_size]`` exponentials from an identically seeded generator
(exactly the draws ``multinomial`` makes on the gathered probabilities, so the generator ends in the same
state), uses the slice of its shard, and three small collectives finish the job: the global max and the
sum of exponentials (the log-sum-exp for the log-prob) and an all-gather of each rank's best
(key, token, log-prob). Tokens equal ``sample_next_tokens``' up to floating-point ties between the two
formulas; every TP rank returns the same tokens.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .sampling import draw_exponentials

__all__ = ["sample_vocab_parallel"]


def sample_vocab_parallel(local: torch.Tensor, *, vocab_start: int, vocab_size: int, temperature: float = 1.0,
                          greedy: bool = False, generator: Optional[torch.Generator] = None,
                          masked: Optional[torch.Tensor] = None, tp_group=None,
                          noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One token per row from this rank's logits shard.

    Args:
        local: [B, V_local] logits of vocabulary entries ``vocab_start .. vocab_start + V_local - 1``.
        vocab_size: the real vocabulary; columns at or past it are never drawn (megatron's padding).
        masked: optional [V_local] bool, columns never drawn (banned tokens); they get probability 0.
        temperature / greedy / generator: as in ``sample_next_tokens`` (the generator must be seeded alike on
            every TP rank).
        tp_group: the TP group (None: one rank holds the whole vocabulary).
        noise: optional [B, vocab_size] fp32 exponential draws (:func:`~.sampling.draw_exponentials`) to use
            instead of drawing them from ``generator``: the static decoder draws a whole chunk's once per step and
            hands each row its own row (after dropping finished rows, per pipeline micro-batch), so the tokens
            equal an unsplit batch's.

    Returns:
        ``(tokens [B] int64, logp [B] float32)``, logp = log softmax(logits / T)[token] over the allowed entries.
    """
    if local.dim() != 2:
        raise ValueError(f"sample_vocab_parallel: logits must be [B, V_local], got shape {tuple(local.shape)}")
    if not greedy and temperature <= 0:
        raise ValueError(f"sample_vocab_parallel: temperature = {temperature} must be > 0 (or greedy=True)")
    b, width = local.shape
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    scaled = local.float() / (1.0 if greedy else temperature)
    cols = torch.arange(vocab_start, vocab_start + width, device=local.device)
    drop = cols >= vocab_size
    if masked is not None:
        drop = drop | masked
    scaled = scaled.masked_fill(drop, float("-inf"))
    # global log-sum-exp from two [B] reductions
    top = scaled.amax(dim=-1)
    if tp > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=tp_group)
    total = torch.exp(scaled - top[:, None]).sum(dim=-1)
    if tp > 1:
        dist.all_reduce(total, group=tp_group)
    lse = top + total.log()
    if greedy:
        key = scaled
    else:
        if noise is None:
            noise = draw_exponentials(b, vocab_size, generator, local.device)
        elif tuple(noise.shape) != (b, vocab_size):
            raise ValueError(f"sample_vocab_parallel: noise has shape {tuple(noise.shape)}, expected {(b, vocab_size)}")
        lo, hi = min(max(vocab_start, 0), vocab_size), min(vocab_start + width, vocab_size)
        e = torch.ones(b, width, device=local.device, dtype=torch.float32)
        e[:, : hi - lo] = noise[:, lo:hi]
        key = scaled - e.log()
    best, idx = key.max(dim=-1)
    logp = scaled.gather(1, idx[:, None]).squeeze(1) - lse
    pack = torch.stack([best.double(), (idx + vocab_start).double(), logp.double()])  # [3, B]
    if tp > 1:
        parts = [torch.empty_like(pack) for _ in range(tp)]
        dist.all_gather(parts, pack, group=tp_group)
        gathered = torch.stack(parts)  # [TP, 3, B]
        winner = gathered[:, 0].argmax(dim=0)  # the first rank holding the max: the lowest index on a tie
        pack = gathered.gather(0, winner.view(1, 1, b).expand(1, 3, b))[0]
    return pack[1].long(), pack[2].float()
