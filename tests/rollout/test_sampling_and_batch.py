"""Rollout pieces that do not need a model: sampling from (vocab-parallel) logits, stop conditions, and the
packed batch whose masks must put the forced prefix and the generated tokens on the right targets."""

import math

import pytest
import torch

from megatron_rcpa.algo import LossConfig, rcpa_loss
from megatron_rcpa.rollout.batch import Rollout, pack_rollouts
from megatron_rcpa.rollout.sampling import StopChecker, draw_exponentials, sample_next_tokens, top_p_filter


def test_pack_puts_prefix_and_generation_on_their_targets():
    rs = [
        Rollout(0, [1, 2, 3], [10, 11], [20, 21, 99], [-0.1, -0.2, -0.3]),
        Rollout(0, [1, 2, 3], [10, 11], [22], [-0.5], finished=False),
        Rollout(7, [4, 5], [], [30, 31], [-1.0, -2.0]),
    ]
    b = pack_rollouts(rs, [1.0, -1.0, 0.5], pad_id=0, pad_to_multiple=4)
    assert b.tokens.shape == (3, 8)
    assert b.tokens[0].tolist() == [1, 2, 3, 10, 11, 20, 21, 99]
    assert b.lengths.tolist() == [8, 6, 4]
    for i, r in enumerate(rs):
        assert b.targets[i][b.constrained_mask[i]].tolist() == r.prefix_tokens
        assert b.targets[i][b.gen_mask[i]].tolist() == r.generated_tokens
        assert b.rollout_logp[i][b.gen_mask[i]].tolist() == pytest.approx(r.rollout_logp)
    assert b.advantages[1][b.gen_mask[1]].tolist() == [-1.0]
    assert b.prompt_ids[:, 0].tolist() == [0, 0, 7] and b.seq_ids[2].unique().tolist() == [2]
    assert not (b.gen_mask & b.constrained_mask).any()
    # the shared prefix of prompt 0 is counted once by the loss
    logp = torch.full(b.tokens.shape, -1.0)
    _, m = rcpa_loss(logp, logp, b.advantages, b.gen_mask, config=LossConfig(), constrained_mask=b.constrained_mask,
                     seq_ids=b.seq_ids, prompt_ids=b.prompt_ids, lambda_t=1.0)
    assert m["imit_nll"].item() == pytest.approx(1.0)


def test_micro_batches_split_consecutive_rows_and_bad_packs_are_named():
    from megatron_rcpa.train.step import split_micro_batches  # the trainer's micro-batching of a pack

    rs = [Rollout(g, [1], [2], [3], [0.0]) for g in (0, 0, 0, 1, 1, 1, 2, 2, 2)]
    b = pack_rollouts(rs, [0.0] * 9, pad_id=0)
    micro = split_micro_batches(b, micro_batch_size=3, group_size=3)
    assert [mb.prompt_ids[:, 0].tolist() for mb in micro] == [[0, 0, 0], [1, 1, 1], [2, 2, 2]]
    # a prompt's rollouts may span micro-batches now (the imitation weights are taken over the whole batch)
    assert [mb.prompt_ids[:, 0].tolist() for mb in split_micro_batches(b, micro_batch_size=1)] == [
        [g] for g in (0, 0, 0, 1, 1, 1, 2, 2, 2)]
    with pytest.raises(ValueError, match="9 rollouts per rank do not split into micro-batches of 2"):
        split_micro_batches(b, micro_batch_size=2)
    with pytest.raises(ValueError, match="rollouts of prompt 0 are not consecutive"):
        pack_rollouts([rs[0], rs[3], rs[1]], [0.0] * 3, pad_id=0)
    with pytest.raises(ValueError, match="2 generated tokens but 1 rollout log-probs"):
        Rollout(0, [1], [], [5, 6], [0.0])


def test_sampling_greedy_temperature_and_logp():
    logits = torch.tensor([[0.0, 2.0, 1.0, 5.0], [3.0, 0.0, 0.0, 9.0]])
    tok, lp = sample_next_tokens(logits, greedy=True, temperature=2.0, vocab_size=3)  # column 3 is padding
    assert tok.tolist() == [1, 0]
    assert lp.tolist() == pytest.approx(torch.log_softmax(logits[:, :3] / 2.0, -1)[[0, 1], [1, 0]].tolist())
    g = torch.Generator().manual_seed(0)
    toks = torch.stack([sample_next_tokens(logits, generator=g, temperature=0.5)[0] for _ in range(400)])
    freq = (toks[:, 0] == 3).float().mean().item()
    assert freq == pytest.approx(torch.softmax(logits[0] / 0.5, -1)[3].item(), abs=0.05)


def test_top_p_keeps_the_smallest_nucleus():
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(lp, 0.7))[0].tolist()
    assert kept == [True, True, False, False]
    assert torch.isfinite(top_p_filter(lp, 0.1))[0].tolist() == [True, False, False, False]
    assert torch.isfinite(top_p_filter(lp, 1.0)).all()
    g = torch.Generator().manual_seed(1)
    toks = {sample_next_tokens(lp, top_p=0.7, generator=g)[0].item() for _ in range(200)}
    assert toks == {0, 1}


def test_stop_checker():
    s = StopChecker(eos_token_ids=[2], stop_strings=["\n\n"], decode=lambda ids: "".join(chr(96 + i) for i in ids))
    assert s.is_done([5, 2]) and not s.is_done([5, 6])
    s2 = StopChecker(stop_strings=["cd"], decode=lambda ids: "".join(chr(96 + i) for i in ids))
    assert s2.is_done([1, 2, 3, 4]) and not s2.is_done([1, 2, 3])
    with pytest.raises(ValueError, match="need a decode function"):
        StopChecker(stop_strings=["x"])
    assert math.isfinite(sample_next_tokens(torch.zeros(1, 3))[1].item())


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_a_subset_of_rows_draws_what_the_whole_batch_draws(top_p):
    """noise (the static decoder after compaction: the whole chunk's draw_exponentials, each row reading its own
    row): the rows left draw the tokens the whole batch's torch.multinomial draws for them, and the generator
    ends in the same state."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 3
    rows = torch.tensor([4, 1, 5])
    for seed in range(20):
        g_full, g_sub = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        tok, lp = sample_next_tokens(logits, temperature=0.9, top_p=top_p, generator=g_full)
        noise = draw_exponentials(6, 50, g_sub, logits.device).index_select(0, rows)
        sub, sub_lp = sample_next_tokens(logits[rows], temperature=0.9, top_p=top_p, noise=noise)
        assert torch.equal(sub, tok[rows]) and torch.equal(sub_lp, lp[rows])
        assert torch.equal(g_full.get_state(), g_sub.get_state())
    with pytest.raises(ValueError, match=r"noise has shape \(6, 50\), expected \(3, 50\)"):
        sample_next_tokens(logits[rows], noise=draw_exponentials(6, 50, g_sub, logits.device))
