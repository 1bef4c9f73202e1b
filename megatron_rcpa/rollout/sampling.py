"""Next-token sampling from vocab-parallel logits, and stop conditions.

Megatron's output layer leaves each tensor-parallel rank with a contiguous shard of the (padded)
vocabulary. Sampling needs the whole distribution of the LAST position only (``[B, V]``, small), so
:func:`sample_next_tokens` all-gathers those rows over the TP group; every TP rank then holds bit-identical
logits and, with a generator seeded identically on every TP rank, draws the same tokens (no broadcast).

The returned log-prob is ``log softmax(logits / T)[token]``, the quantity the trainer recomputes for the
old policy; top-p only restricts which tokens may be drawn. The trainer logs the gap between the two as the
rollout-vs-training log-prob mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


def gather_vocab_shards(logits: torch.Tensor, tp_group=None) -> torch.Tensor:
    """``[..., V_local]`` on each TP rank -> ``[..., V_local * TP]`` (the padded global vocabulary)."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, logits.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)


def top_p_filter(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf the log-probs outside the smallest set whose probability reaches ``top_p``
    (the most likely token is always kept)."""
    if top_p >= 1.0:
        return logprobs
    sorted_lp, order = torch.sort(logprobs, dim=-1, descending=True)
    before = torch.cumsum(sorted_lp.exp(), dim=-1) - sorted_lp.exp()  # mass strictly above each token
    drop_sorted = before >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logprobs.masked_fill(drop, float("-inf"))


def sample_next_tokens(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: Optional[torch.Generator] = None,
    tp_group=None,
    vocab_size: Optional[int] = None,
    noise: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from ``logits`` ``[B, V_local]`` (vocab-parallel when ``tp_group`` is given).

    Returns ``(tokens [B] int64, logp [B] float32)`` with logp = log softmax(logits / T)[token] over the
    real vocabulary (``vocab_size`` drops Megatron's padded columns).

    ``noise``: optional ``[B, vocab]`` exponential draws ``E`` (:func:`draw_exponentials`) used instead of
    ``torch.multinomial``, which for one sample draws ``E ~ Exp(1)`` of the probabilities' shape and returns
    ``argmax(p / E)``. The static decoder draws a whole chunk's ``E`` once per step and hands each row its own
    row of it (after dropping finished rows, and per pipeline micro-batch): tokens and the generator's state
    are then those of sampling the full batch, whichever rows are present.
    """
    if logits.dim() != 2:
        raise ValueError(f"sample_next_tokens: logits must be [B, V_local], got shape {tuple(logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"sample_next_tokens: temperature = {temperature} must be > 0 (use greedy=True)")
    full = gather_vocab_shards(logits, tp_group).float()
    if vocab_size is not None:
        if vocab_size > full.shape[-1]:
            raise ValueError(f"vocab_size = {vocab_size} exceeds the gathered logits' width {full.shape[-1]}")
        full = full[:, :vocab_size]
    logprobs = torch.log_softmax(full / temperature, dim=-1)
    if greedy:
        tokens = logprobs.argmax(dim=-1)
    else:
        probs = top_p_filter(logprobs, top_p).exp()
        if noise is None:
            # multinomial draws on the CPU generator's device; keep generator and probs on one device
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            if tuple(noise.shape) != tuple(probs.shape):
                raise ValueError(f"sample_next_tokens: noise has shape {tuple(noise.shape)}, expected "
                                 f"{tuple(probs.shape)}")
            tokens = (probs / noise).argmax(dim=-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def draw_exponentials(rows: int, vocab_size: int, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """``[rows, vocab_size]`` fp32 ``Exp(1)`` draws: those ``torch.multinomial`` makes for one sample of a
    ``[rows, vocab_size]`` fp32 batch (the ``noise`` of :func:`sample_next_tokens` and of
    :func:`~megatron_rcpa.rollout.vocab_parallel_sampling.sample_vocab_parallel`)."""
    return torch.empty(rows, vocab_size, device=device, dtype=torch.float32).exponential_(generator=generator)


@dataclass
class StopChecker:
    """Decides when a completion ends: an EOS token id, or a stop string in its decoded text.

    ``decode(token_ids) -> str`` is needed only when ``stop_strings`` is non-empty. The EOS token is kept in
    the completion (it is trained on); a stop string ends the completion at the token that completed it.
    """

    eos_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    decode: Optional[object] = None
    _eos: set = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._eos = {int(t) for t in self.eos_token_ids}
        if self.stop_strings and self.decode is None:
            raise ValueError("StopChecker: stop_strings need a decode function (the tokenizer's decode)")

    def is_done(self, completion: List[int]) -> bool:
        if completion and completion[-1] in self._eos:
            return True
        if self.stop_strings:
            text = self.decode(completion)  # type: ignore[operator]
            return any(s in text for s in self.stop_strings)
        return False
