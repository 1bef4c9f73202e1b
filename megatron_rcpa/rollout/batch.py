"""Rollouts and the packed training batch built from them (RCPA_SPEC sections 2 and 4).

A rollout is ``prompt ⊕ forced prefix y*_{1..k} ⊕ generated continuation``. Training predicts token
``t + 1`` at position ``t``, so the masks below live on TARGET positions: ``constrained_mask`` is True where
the target is a forced prefix token (the imitation set C) and ``gen_mask`` where it is a generated token
(the policy-gradient set O). The G rollouts of one prompt share ``prompt_id`` and the same prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch


@dataclass
class Rollout:
    prompt_id: int  # the group: all G rollouts of one prompt share it
    prompt_tokens: List[int]
    prefix_tokens: List[int]  # the forced y*_{1..k}; empty for probes and in reinforcement alignment
    generated_tokens: List[int]
    rollout_logp: List[float]  # log pi_old(token) as sampled, one per generated token
    finished: bool = True  # stopped by EOS / a stop string (False: hit max_new_tokens)

    def __post_init__(self) -> None:
        if len(self.rollout_logp) != len(self.generated_tokens):
            raise ValueError(f"rollout of prompt {self.prompt_id}: {len(self.generated_tokens)} generated tokens "
                             f"but {len(self.rollout_logp)} rollout log-probs")
        if not self.prompt_tokens:
            raise ValueError(f"rollout of prompt {self.prompt_id}: empty prompt")

    @property
    def tokens(self) -> List[int]:
        return self.prompt_tokens + self.prefix_tokens + self.generated_tokens

    @property
    def response_tokens(self) -> List[int]:
        """What the reward judges: the forced prefix and the continuation together."""
        return self.prefix_tokens + self.generated_tokens


@dataclass
class RolloutBatch:
    tokens: torch.Tensor  # [N, S] int64 input ids, right-padded with pad_id
    targets: torch.Tensor  # [N, S] tokens shifted left by one (pad at the end)
    gen_mask: torch.Tensor  # [N, S] bool, target is a generated token
    constrained_mask: torch.Tensor  # [N, S] bool, target is a forced prefix token
    seq_ids: torch.Tensor  # [N, S] int64 rollout index
    prompt_ids: torch.Tensor  # [N, S] int64 group (prompt) id
    rollout_logp: torch.Tensor  # [N, S] float32 sampled log-prob at generated targets, 0 elsewhere
    advantages: torch.Tensor  # [N, S] float32 the rollout's advantage at its generated targets, 0 elsewhere
    lengths: torch.Tensor  # [N] int64 unpadded sequence lengths

    @property
    def num_rollouts(self) -> int:
        return int(self.tokens.shape[0])

    def select(self, rows: torch.Tensor | Sequence[int]) -> RolloutBatch:
        rows = torch.as_tensor(rows, dtype=torch.long)
        return RolloutBatch(**{k: v[rows] for k, v in self.__dict__.items()})


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded to one width, so every row's next token lands in the same column (decoding):
    ``(tokens [B, S] int64, mask [B, S] int64)`` with mask 1 on real tokens."""
    b, width = len(seqs), max(len(s) for s in seqs)
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for r, s in enumerate(seqs):
        tokens[r, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
        mask[r, width - len(s):] = 1
    return tokens, mask


def pack_rollouts(rollouts: Sequence[Rollout], advantages: Sequence[float], pad_id: int,
                  pad_to_multiple: int = 1) -> RolloutBatch:
    """Pack rollouts (grouped by prompt: keep a group's rollouts consecutive) into right-padded tensors."""
    if len(advantages) != len(rollouts):
        raise ValueError(f"pack_rollouts: {len(rollouts)} rollouts but {len(advantages)} advantages")
    if not rollouts:
        raise ValueError("pack_rollouts: no rollouts")
    seen, prev = set(), None
    for r in rollouts:
        if r.prompt_id != prev and r.prompt_id in seen:
            raise ValueError(f"pack_rollouts: the rollouts of prompt {r.prompt_id} are not consecutive")
        seen.add(r.prompt_id)
        prev = r.prompt_id
    n = len(rollouts)
    s = max(len(r.tokens) for r in rollouts)
    s = -(-s // pad_to_multiple) * pad_to_multiple
    tokens = torch.full((n, s), pad_id, dtype=torch.long)
    targets = torch.full((n, s), pad_id, dtype=torch.long)
    gen = torch.zeros((n, s), dtype=torch.bool)
    cons = torch.zeros((n, s), dtype=torch.bool)
    rlp = torch.zeros((n, s), dtype=torch.float32)
    adv = torch.zeros((n, s), dtype=torch.float32)
    prompt_ids = torch.empty((n, s), dtype=torch.long)
    lengths = torch.empty(n, dtype=torch.long)
    for i, (r, a) in enumerate(zip(rollouts, advantages)):
        seq = r.tokens
        p, k, g = len(r.prompt_tokens), len(r.prefix_tokens), len(r.generated_tokens)
        tokens[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        targets[i, : len(seq) - 1] = tokens[i, 1: len(seq)]
        # target position t predicts token t + 1: the prefix occupies tokens [p, p + k)
        cons[i, p - 1: p - 1 + k] = True
        gen[i, p - 1 + k: p - 1 + k + g] = True
        rlp[i, p - 1 + k: p - 1 + k + g] = torch.tensor(r.rollout_logp, dtype=torch.float32)
        adv[i, p - 1 + k: p - 1 + k + g] = float(a)
        prompt_ids[i] = r.prompt_id
        lengths[i] = len(seq)
    seq_ids = torch.arange(n, dtype=torch.long)[:, None].expand(n, s).clone()
    return RolloutBatch(tokens, targets, gen, cons, seq_ids, prompt_ids, rlp, adv, lengths)
