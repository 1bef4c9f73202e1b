"""optim.micro_batch_size independent of rcpa.group_size: a prompt's rollouts may span micro-batches, and the
imitation term still weights each constrained token by 1 / (the prompt's rollouts in the WHOLE batch).

Checked on the loss itself (the algo reference and the fused ops path): the micro-batch losses summed equal
the whole-batch loss, value and gradient, for every split; for splits that were valid before (whole groups)
the weights and counts are bit-identical to the former per-micro-batch ones. Then one training step through
megatron's schedule (one process) with micro-batches of 2 and 4 rollouts (groups of 3 split) against
micro-batches of 3 (whole groups): same loss, metrics and gradients.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rcpa.algo.config import LossConfig
from megatron_rcpa.algo.loss import GlobalCounts, count_tokens, imitation_weights, rcpa_loss
from megatron_rcpa.rollout.batch import Rollout, pack_rollouts
from megatron_rcpa.train.step import batch_imitation_weights, global_counts, split_micro_batches

D = torch.float64
G, PROMPTS, VOCAB = 3, 4, 250


def make_batch(group=G, prompts=PROMPTS):
    """Prompts with forced prefixes of 0..3 tokens (prompt 0 none), ``group`` rollouts each, one rollout of
    prompt 1 without a constrained token (its prefix is empty there: the count is of rollouts HOLDING one)."""
    g = torch.Generator().manual_seed(0)
    rollouts, adv = [], []
    for p in range(prompts):
        prompt = torch.randint(0, VOCAB, (2 + p % 2,), generator=g).tolist()
        prefix = torch.randint(0, VOCAB, (p % 4,), generator=g).tolist()
        for j in range(group):
            gen = torch.randint(0, VOCAB, (3 + (p + j) % 3,), generator=g).tolist()
            pre = [] if (p == 2 and j == 0) else prefix
            rollouts.append(Rollout(p, prompt, pre, gen, (-5.5 + 0.3 * torch.randn(len(gen), generator=g)).tolist()))
            adv.append(float(torch.randn((), generator=g)))
    return pack_rollouts(rollouts, adv, pad_id=0)


def _loss_inputs(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = batch.tokens.shape
    logp = (-torch.rand(shape, generator=g, dtype=D) * 3).requires_grad_(True)
    old = (logp.detach() + 0.3 * torch.randn(shape, generator=g, dtype=D))
    ref = (logp.detach() + 0.3 * torch.randn(shape, generator=g, dtype=D))
    return logp, old, ref


def _rows(t, sl):
    return None if t is None else t[sl]


@pytest.mark.parametrize("mbs", [1, 2, 3, 4, 6, 12])
def test_split_micro_batch_losses_sum_to_the_whole_batch(mbs):
    batch = make_batch()
    logp, old, ref = _loss_inputs(batch)
    cfg = LossConfig(beta=0.05, dual_clip=3.0, aggregation="seq_mean_token_mean")
    adv = batch.advantages.to(D)
    kw = dict(config=cfg, lambda_t=0.7)
    full, mfull = rcpa_loss(logp, old, adv, batch.gen_mask, ref_logp=ref, constrained_mask=batch.constrained_mask,
                            seq_ids=batch.seq_ids, prompt_ids=batch.prompt_ids, **kw)
    (g_full,) = torch.autograd.grad(full, logp)

    micro = split_micro_batches(batch, mbs)
    weights = batch_imitation_weights(micro)
    counts = global_counts(micro, None, weights)
    assert counts.num_imit_tokens == pytest.approx(float(
        count_tokens(batch.gen_mask, batch.constrained_mask, batch.seq_ids, batch.prompt_ids).num_imit_tokens))
    total = torch.zeros((), dtype=D)
    imit_nll = 0.0
    for i, (mb, w) in enumerate(zip(micro, weights)):
        sl = slice(i * mbs, (i + 1) * mbs)
        loss, m = rcpa_loss(logp[sl], old[sl], adv[sl], mb.gen_mask, ref_logp=ref[sl],
                            constrained_mask=mb.constrained_mask, seq_ids=mb.seq_ids, prompt_ids=mb.prompt_ids,
                            counts=counts, imitation_weight=w, **kw)
        total = total + loss
        imit_nll += float(m["imit_nll"])
    (g_split,) = torch.autograd.grad(total, logp)
    torch.testing.assert_close(total, full.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_split, g_full, rtol=1e-12, atol=1e-14)
    assert imit_nll == pytest.approx(float(mfull["imit_nll"]), rel=1e-12)
    if mbs % G == 0:  # a layout that was valid before: the same numbers as the per-micro-batch weights
        for mb, w in zip(micro, weights):
            own = imitation_weights(mb.constrained_mask.reshape(-1).bool(), mb.seq_ids.reshape(-1),
                                    mb.prompt_ids.reshape(-1))
            assert torch.equal(w.reshape(-1), own)
        assert global_counts(micro) == counts
    else:  # the per-micro-batch weights would count a split group's prefix once per piece
        naive = sum((count_tokens(mb.gen_mask, mb.constrained_mask, mb.seq_ids, mb.prompt_ids) for mb in micro),
                    GlobalCounts(0.0, 0.0, 0.0))
        assert naive.num_imit_tokens > counts.num_imit_tokens


def test_weights_are_one_over_the_prompts_rollouts_in_the_whole_batch():
    batch = make_batch()
    weights = torch.cat(batch_imitation_weights(split_micro_batches(batch, 1)))
    cons = batch.constrained_mask
    for row in range(batch.num_rollouts):
        p = int(batch.prompt_ids[row, 0])
        holding = sum(bool(cons[r].any()) for r in range(batch.num_rollouts) if int(batch.prompt_ids[r, 0]) == p)
        expected = torch.where(cons[row], torch.tensor(1.0 / max(holding, 1), dtype=D), torch.zeros((), dtype=D))
        assert torch.equal(weights[row], expected), f"row {row} (prompt {p}, {holding} rollouts with a prefix)"
    assert {int(batch.prompt_ids[r, 0]) for r in range(batch.num_rollouts) if cons[r].any()} == {1, 2, 3}
    # prompt 2: two of its three rollouts hold the prefix -> 1/2 each
    assert sorted({round(float(w), 6) for w in weights[weights > 0]}) == [0.333333, 0.5]


def test_bucketed_micro_batches_repeat_seq_ids_but_keep_rollouts_apart():
    """Length buckets pack each micro-batch on its own (seq_ids restart at 0 in each): a rollout is a row of
    one micro-batch, so equal seq_ids in two micro-batches are two rollouts."""
    batch = make_batch()
    rows = [list(range(0, 5)), list(range(5, 12))]
    packed = [pack_rollouts([Rollout(int(batch.prompt_ids[r, 0]), [1], [2] if batch.constrained_mask[r].any()
                                     else [], [3], [0.0]) for r in rs], [0.0] * len(rs), pad_id=0) for rs in rows]
    assert int(packed[1].seq_ids[0, 0]) == 0
    w = batch_imitation_weights(packed)
    # prompt 1 (rows 3..5) spans both: its three rollouts each hold a prefix -> 1/3 everywhere
    assert float(w[0][3].max()) == pytest.approx(1 / 3) and float(w[1][0].max()) == pytest.approx(1 / 3)


def test_fused_loss_takes_the_batch_weights():
    """ops.rcpa_loss_from_logits with ``imitation_weight`` equals the algo reference given the same weights."""
    from megatron_rcpa.ops import rcpa_loss_from_logits

    batch = make_batch(prompts=2)
    micro = split_micro_batches(batch, 2)  # groups of 3 split 2 + 1 + ...
    weights = batch_imitation_weights(micro)
    counts = global_counts(micro, None, weights)
    cfg = LossConfig(aggregation="token_mean")
    g = torch.Generator().manual_seed(3)
    mb, w = micro[1], weights[1]  # rows 2, 3: the last of prompt 0, the first of prompt 1
    logits = torch.randn(*mb.tokens.shape, 64, generator=g)
    targets = mb.targets.clamp(max=63)
    from megatron_rcpa.ops import masked_logprob

    lp = masked_logprob(logits.double(), targets, None, impl="torch")
    adv = mb.advantages
    ref_loss, _ = rcpa_loss(lp, lp.detach(), adv, mb.gen_mask, config=cfg, constrained_mask=mb.constrained_mask,
                            seq_ids=mb.seq_ids, prompt_ids=mb.prompt_ids, lambda_t=0.5, counts=counts,
                            imitation_weight=w)
    for impl in ("torch", "triton"):
        loss, _ = rcpa_loss_from_logits(logits, targets, lp.detach().float(), adv, mb.gen_mask, config=cfg,
                                        constrained_mask=mb.constrained_mask, seq_ids=mb.seq_ids,
                                        prompt_ids=mb.prompt_ids, lambda_t=0.5, counts=counts, impl=impl,
                                        imitation_weight=w)
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5), impl
    own, _ = rcpa_loss(lp, lp.detach(), adv, mb.gen_mask, config=cfg, constrained_mask=mb.constrained_mask,
                       seq_ids=mb.seq_ids, prompt_ids=mb.prompt_ids, lambda_t=0.5, counts=counts)
    assert float(own) != pytest.approx(float(ref_loss), rel=1e-3)  # the micro-batch's own weights differ


# ---------------------------------------------------------------------------- through megatron's schedule
def _step_worker(mbs_list):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_rcpa.testing import gather_global_tensors, tiny_gpt_model, tiny_transformer_config
    from megatron_rcpa.train.step import StepConfig, train_step

    batch = make_batch()  # 12 rollouts, groups of 3
    out = {}
    for mbs in mbs_list:
        torch.manual_seed(0)
        config = tiny_transformer_config(normalization="RMSNorm")
        model = tiny_gpt_model(config, vocab_size=VOCAB, max_seq=32)
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, bf16=False,
                                                     params_dtype=torch.float32), [ddp])
        config.finalize_model_grads_func = finalize_model_grads
        cfg = StepConfig(loss=LossConfig(dual_clip=3.0, aggregation="seq_mean_token_mean"), lambda_t=0.5,
                         vocab_size=VOCAB, impl="torch")
        micro = split_micro_batches(batch, mbs)
        metrics = train_step(ddp, opt, micro, None, cfg)
        out[mbs] = {"metrics": metrics, "grads": gather_global_tensors(ddp, "grad")}
    return out


@pytest.mark.multiproc
@pytest.mark.megatron
def test_train_step_with_split_groups_matches_whole_groups():
    from megatron_rcpa.testing import run_distributed

    res = run_distributed(_step_worker, world_size=1, args=([3, 2, 4],), timeout=300)[0]
    base = res[3]  # whole groups
    assert base["metrics"]["imit_nll"] > 0 and base["metrics"]["grad_norm"] > 0
    for mbs in (2, 4):  # groups of 3 split
        got = res[mbs]
        for k, v in base["metrics"].items():
            assert got["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), f"mbs={mbs} metric {k}"
        for k, v in base["grads"].items():
            torch.testing.assert_close(got["grads"][k], v, rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
