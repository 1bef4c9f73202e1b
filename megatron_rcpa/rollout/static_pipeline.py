"""Static-shape rollout decoding at pipeline parallelism PP > 1 (issue 12): every stage busy, no per-token host sync.

    results = pipeline_generate(policy, input_ids, attention_mask, groups=groups, max_new_tokens=64, pad_id=0,
                                vocab_size=V, generator=gen, ...)     # same keywords as static_generate, plus:
        groups,               # megatron_rcpa.runtime.parallel.ParallelGroups of this rank (its PP and TP groups)
        microbatches=None,    # split the rows into this many micro-batches (default: PP; clipped to the rows)
        row_image_grid_thw=None,  # Qwen2.5-VL with image_rows: the per-row grids (positions on every stage)
        timing=None,          # a dict to fill with this stage's busy / wall seconds (the pipeline bubble)
    -> the same list of (generated_tokens, rollout_logp, finished) per row on EVERY stage

:func:`pipeline_generate_rows` is the drop-in for ``RolloutEngine._generate_rows`` (the engine calls it when
``decode="static"`` and PP > 1).

Each stage runs its own layers with the :class:`~megatron_rcpa.rollout.static_decode.StaticDecoder` building
blocks (``prefill_layers`` / ``decode_layers``: the PP = 1 arithmetic, the policy's parameters read in place)
and holds the KV cache of its own layers only, one preallocated cache per micro-batch. The first stage embeds
(each prompt's images encoded once for the whole chunk and shared by its rows, as at PP = 1); the last stage
applies the final norm and the output layer to the last position only and samples on the device.

Schedule. The B rows are split into M micro-batches (M = PP by default). Every stage works through the same
items in the same order: the prefill of micro-batches 0..M-1, then decode step t = 1, 2, ... of micro-batches
0..M-1. A stage receives its input for an item (hidden states from the previous stage; on the first stage the
micro-batch's previous tokens, sent back by the last stage), runs its layers and sends the result on (hidden
states to the next stage; on the last stage the sampled tokens, already replaced by ``pad_id`` for finished
rows, to the first stage). Step t + 1 of micro-batch m needs only step t of micro-batch m, so while stage s
works on micro-batch m, stage s - 1 works on micro-batch m + 1: with M = PP the stages never wait in the
steady state (the bubble is the pipeline's fill and drain plus the last stage's sampling). With M = 1 each
stage idles (PP - 1) / PP of the time. Sends and the next item's receive are posted together
(``batch_isend_irecv``, as megatron's schedules do).

Host syncs: none per token. The last stage checks stop strings and "every row finished" on the host every
``stop_check_every`` steps (after the step's last micro-batch, as at PP = 1). Its verdict travels with the tokens
of that micro-batch to the first stage; only at those items do stages read a flag on the host. By then the first
stage has already started the next step's first M - 1 micro-batches (speculatively; the others discard them): on
"stop" it sends a stop marker down the pipeline instead of the next item, and every stage ends after it. At the
end the last stage broadcasts the tokens, log-probs, lengths and finished flags to the whole pipeline. Finished
rows are fed ``pad_id`` (the last stage puts it in their token messages) and still computed, as at PP = 1.
Before the first message every stage checks the chunk (images on the first stage, sampling settings everywhere)
and the stages agree in one small all-reduce, so a refusal on one stage raises on all of them.

Sampling is identical to PP = 1: the last stage draws a whole step's randomness once, before the step's first
micro-batch (the ``[B, V]`` exponentials that ``torch.multinomial`` and the vocab-parallel Gumbel-max draw for
the unsplit batch), and samples each micro-batch from its rows' slice (``argmax p / E``, which is what
``multinomial`` computes from those draws; top-p, banned tokens, temperature and the returned log-prob as
:func:`~megatron_rcpa.rollout.sampling.sample_next_tokens`). Same seeds, same tokens; the generator ends in the
state the PP = 1 path leaves (restored to the last row's end when every row finishes early). Only the last
stage draws, as in the reference PP loop. (Checked on a CPU; on a GPU it holds as long as ``torch.multinomial``
draws one sample through that exponential fast path, as its device-generic code does; not yet run on a GPU.)

Not here yet: CUDA graphs (each stage runs eagerly; a per-stage graph per micro-batch shape would be next),
sequence parallelism (the engine switches it off for decoding), compaction of finished rows.
"""

from __future__ import annotations

import time
import weakref
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from .static_decode import LENGTH_BUCKET, StaticDecoder, _host_check, _round_up, _Sampler

__all__ = ["pipeline_generate", "pipeline_generate_rows", "stage_decoder_for"]

_STAGE_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def stage_decoder_for(policy, tp_group=None) -> StaticDecoder:
    """The (cached) :class:`StaticDecoder` of one pipeline stage of ``policy``."""
    per_policy = _STAGE_DECODERS.setdefault(policy, {})
    key = id(tp_group) if tp_group is not None else None
    if key not in per_policy:
        per_policy[key] = StaticDecoder(policy, tp_group, pipeline_stage=True)
    return per_policy[key]


class _StageCache:
    """One micro-batch's KV cache of this stage's layers, key mask, next slot and RoPE position."""

    def __init__(self, dec: StaticDecoder, batch: int, length: int, device, dtype, table) -> None:
        shape = (batch, dec.groups, length, dec.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(dec.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(dec.num_layers)]
        self.valid = torch.zeros(batch, length, dtype=torch.bool, device=device)
        self.col = torch.zeros(batch, dtype=torch.long, device=device)
        self.rope_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.table = table


class _Record:
    """The last stage's outputs of every row (the attributes ``_host_check`` reads)."""

    def __init__(self, batch: int, max_new: int, device) -> None:
        self.batch, self.max_new = batch, max_new
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch, max_new + 1, dtype=torch.long, device=device)  # +1: overflow column
        self.logps = torch.zeros(batch, max_new + 1, dtype=torch.float32, device=device)
        self.tok_in = torch.zeros(batch, dtype=torch.long, device=device)


class _StageSampler:
    """The PP = 1 sampler (``_Sampler``: a step's draws made once for the whole chunk, each micro-batch reading
    its rows' slice) with the last stage's per-micro-batch bookkeeping."""

    def __init__(self, base: _Sampler) -> None:
        self.base = base

    def record(self, rec: _Record, rows: slice, t: int, tok: torch.Tensor, lp: torch.Tensor) -> None:
        """``_Sampler.sample_and_record`` on the rows of one micro-batch at step ``t``."""
        done = rec.done[rows]
        live = ~done
        col = torch.where(live, torch.full_like(tok, t), torch.full_like(tok, rec.max_new)).view(-1, 1)
        rec.tokens[rows].scatter_(1, col, tok.view(-1, 1))
        rec.logps[rows].scatter_(1, col, lp.view(-1, 1))
        rec.lengths[rows] += live.long()
        done |= live & torch.isin(tok, self.base.eos)
        rec.tok_in[rows] = torch.where(done, torch.full_like(tok, self.base.pad_id), tok)


class _Link:
    """Point-to-point messages of this stage; a send and the next receive are posted together."""

    def __init__(self, groups) -> None:
        self.group = groups.pp_group
        self.prev, self.next = groups.pp_prev_rank, groups.pp_next_rank
        self.first, self.last = groups.pp_first_rank, groups.pp_last_rank
        self.pending: List = []  # (work, tensor) of sends not yet known complete

    def exchange(self, send: Optional[torch.Tensor], dst: Optional[int], recv: Optional[torch.Tensor],
                 src: Optional[int]) -> None:
        ops = []
        if send is not None:
            ops.append(dist.P2POp(dist.isend, send, dst, self.group))
        if recv is not None:
            ops.append(dist.P2POp(dist.irecv, recv, src, self.group))
        if not ops:
            return
        works = dist.batch_isend_irecv(ops)
        if send is not None:
            self.pending.append((works[0], send))
        if recv is not None:
            works[-1].wait()
        if len(self.pending) > 8:  # keep the buffers of in-flight sends alive, bounded
            for work, _ in self.pending[:-4]:
                work.wait()
            self.pending = self.pending[-4:]

    def close(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending = []


def _splits(batch: int, parts: int) -> List[slice]:
    sizes = [batch // parts + (1 if i < batch % parts else 0) for i in range(parts)]
    out, start = [], 0
    for n in sizes:
        out.append(slice(start, start + n))
        start += n
    return out


@torch.no_grad()
def pipeline_generate(
    policy,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    groups,
    pixel_values: Optional[torch.Tensor] = None,
    image_grid_thw: Optional[torch.Tensor] = None,
    image_rows: Optional[Sequence[int]] = None,
    row_image_grid_thw: Optional[torch.Tensor] = None,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    banned_ids: Sequence[int] = (),
    eos_ids: Sequence[int] = (),
    stop_check: Optional[Callable[[List[int]], bool]] = None,
    pad_id: int,
    vocab_size: int,
    generator: Optional[torch.Generator] = None,
    stop_check_every: int = 8,
    greedy: bool = False,
    vocab_parallel_sampling: bool = False,
    microbatches: Optional[int] = None,
    timing: Optional[dict] = None,
) -> List[tuple]:
    """Generate up to ``max_new_tokens`` per row through the pipeline; see the module docstring.

    Every rank of the pipeline (and every TP rank) calls it with the same arguments; only the last stage's
    ``generator`` is used (seed it as at PP = 1). The images (``pixel_values``, ``image_grid_thw``,
    ``image_rows`` as in :func:`~megatron_rcpa.rollout.static_decode.static_generate`) are read on the first
    stage; Qwen2.5-VL positions need the per-row grids on every stage: ``image_grid_thw`` when ``image_rows`` is
    None, else ``row_image_grid_thw``.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"pipeline_generate: input_ids must be [B, W], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"pipeline_generate: max_new_tokens = {max_new_tokens} must be >= 1")
    if stop_check_every < 1:
        raise ValueError(f"pipeline_generate: stop_check_every = {stop_check_every} must be >= 1")
    if groups.pp_size < 2:
        raise ValueError(f"pipeline_generate: the groups' pp_size is {groups.pp_size}; PP = 1 uses "
                         "static_decode.static_generate")
    tp_group = groups.tp_group if groups.tp_size > 1 else None
    dec = stage_decoder_for(policy, tp_group)
    if (dec.first, dec.last) != (groups.is_first_stage, groups.is_last_stage):
        raise ValueError(f"pipeline_generate: the policy stage (pre_process={dec.first}, post_process={dec.last}) "
                         f"is not this rank's pipeline stage (first={groups.is_first_stage}, "
                         f"last={groups.is_last_stage})")
    b, w = input_ids.shape
    micro = groups.pp_size if microbatches is None else int(microbatches)
    if micro < 1:
        raise ValueError(f"pipeline_generate: microbatches = {microbatches} must be >= 1")
    micro = min(micro, b)
    param = next(policy.language_model.parameters())
    device, dtype = param.device, param.dtype
    input_ids = input_ids.to(device)
    attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).to(device)
    grids_for_positions = image_grid_thw if image_rows is None else row_image_grid_thw
    if dec.mrope and pixel_values is not None and grids_for_positions is None:
        raise ValueError("pipeline_generate: Qwen2.5-VL with image_rows needs row_image_grid_thw (the per-row "
                         "image grids) for the positions on every stage")
    length = _round_up(w + max_new_tokens, LENGTH_BUCKET)
    was_training = policy.training
    policy.eval()
    try:
        return _Pipeline(dec, groups, micro, b, w, length, max_new_tokens, device, dtype, timing).run(
            input_ids, attention_mask, pixel_values, image_grid_thw, image_rows,
            None if grids_for_positions is None else grids_for_positions.to(device),
            sampler_kw=dict(vocab_size=vocab_size, temperature=temperature, top_p=top_p, greedy=greedy,
                            banned_ids=banned_ids, eos_ids=eos_ids, pad_id=pad_id, generator=generator),
            vocab_parallel=vocab_parallel_sampling, stop_check=stop_check, every=int(stop_check_every))
    finally:
        policy.train(was_training)


class _Pipeline:
    """One chunk's pass through the pipeline, seen from one stage."""

    def __init__(self, dec: StaticDecoder, groups, micro: int, batch: int, width: int, length: int, max_new: int,
                 device, dtype, timing: Optional[dict]) -> None:
        self.dec, self.groups = dec, groups
        self.rows = _splits(batch, micro)
        self.micro, self.batch, self.width, self.max_new = micro, batch, width, max_new
        self.device, self.dtype = device, dtype
        self.hidden = dec.policy.language_model.config.hidden_size
        self.length = length
        self.table = dec.rope_table(length, device, dtype)
        self.caches: List[_StageCache] = []
        self.link = _Link(groups)
        self.timing = timing
        self.busy = 0.0

    # ---------------------------------------------------------------------------------------- helpers
    def _check_step(self, t: int) -> bool:
        """Whether the last stage checks on the host after step ``t`` and may stop the run there."""
        return (t + 1) % self.every == 0 and t + 1 < self.max_new

    def _flagged(self, t: int, m: int) -> bool:
        """Item (decode step t, micro-batch m) carries the verdict of the check after step t - 1."""
        return m == self.micro - 1 and self._check_step(t - 1)

    def _tick(self):
        if self.timing is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _hidden_buf(self, m: int, seq: int, flag: bool = False) -> torch.Tensor:
        n = self.rows[m].stop - self.rows[m].start
        return torch.empty(n, seq, self.hidden + int(flag), device=self.device, dtype=self.dtype)

    def _token_buf(self, m: int, flag: bool = False) -> torch.Tensor:
        n = self.rows[m].stop - self.rows[m].start
        return torch.empty(n + int(flag), dtype=torch.long, device=self.device)

    # -------------------------------------------------------------------------------------------- run
    def run(self, input_ids, attention_mask, pixel_values, image_grid_thw, image_rows, position_grids, *,
            sampler_kw, vocab_parallel, stop_check, every):
        dec, g = self.dec, self.groups
        self.every = every
        wall = time.perf_counter()
        start = self._tick()
        failed = None
        try:  # whatever one stage refuses, all stages refuse before any message is sent (no stage left waiting)
            self.caches = [_StageCache(dec, r.stop - r.start, self.length, self.device, self.dtype, self.table)
                           for r in self.rows]
            cos, sin, next_pos = dec._prefill_positions(input_ids, attention_mask, position_grids, self.table)
            emb = None
            if dec.first:
                emb, _ = dec._prefill_input(input_ids, pixel_values, image_grid_thw, image_rows)  # [B, W, H]
            shard = (0, int(sampler_kw["vocab_size"]), None) if vocab_parallel else None  # checks only
            if dec.last and vocab_parallel:
                width = dec._output_weight().shape[0]
                shard = ((0 if dec.tp_group is None else dist.get_rank(dec.tp_group)) * width, width, dec.tp_group)
            base = _Sampler(batch=self.batch, device=self.device, shard=shard, **sampler_kw)  # checks the settings
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other stages heard of it
            failed = exc
        verdict = torch.tensor([0 if failed is None else 1], dtype=torch.long, device=self.device)
        dist.all_reduce(verdict, op=dist.ReduceOp.MAX, group=g.pp_group)
        if failed is not None:
            raise failed
        if int(verdict):
            raise RuntimeError(f"pipeline_generate: another pipeline stage refused this chunk (its error is in its "
                               f"own log); stage {g.pp_rank} stops too")
        self.busy += self._tick() - start
        self.sampler = self.rec = None
        if dec.last:
            self.sampler = _StageSampler(base)
            self.rec = _Record(self.batch, self.max_new, self.device)
            self.gen = base.generator
            self.stop_check, self.checked, self.after = stop_check, [0] * self.batch, {}
            self.slots, self.settled = list(range(self.batch)), set()  # rows never move here (no compaction)
            self.noise = None
        # the prompt's inputs ([B, W, H] embeddings, MRoPE cos/sin [B, W, 1, d]) are dropped after the prefill
        self.prompt = dict(emb=emb, cos=cos, sin=sin, next_pos=next_pos, mask=attention_mask)
        del emb, cos, sin
        if dec.first:
            self._first()
        else:
            self._later()
        self.link.close()
        if self.timing is not None:
            self.timing.update(busy_s=self.busy, wall_s=time.perf_counter() - wall, stage=g.pp_rank,
                               microbatches=self.micro)
        return self._results()

    def _rope(self, cos, m):
        r = self.rows[m]
        return cos if cos.shape[0] == 1 else cos[r]

    def _prefill(self, m: int, x):
        """This stage's layers over micro-batch m's prompt (``x``: its rows' [b, W, H] input)."""
        r, p = self.rows[m], self.prompt
        x = self.dec.prefill_layers(self.caches[m], x, self._rope(p["cos"], m), self._rope(p["sin"], m),
                                    p["mask"][r], p["next_pos"][r])
        if m == self.micro - 1:
            self.prompt = None
        return x

    # ----------------------------------------------------------------------------------- first stage
    def _first(self) -> None:
        link, dec, M, T = self.link, self.dec, self.micro, self.max_new
        for m in range(M):
            t0 = self._tick()
            x = self._prefill(m, self.prompt["emb"][self.rows[m]])
            self.busy += self._tick() - t0
            recv = self._token_buf(0, self._flagged(1, 0)) if (m == M - 1 and T > 1) else None
            link.exchange(x.contiguous(), link.next, recv, link.last)
        for t in range(1, T):
            for m in range(M):
                flagged = self._flagged(t, m)
                if flagged and int(recv[-1]) != 0:  # the last stage says: every row is done
                    link.exchange(torch.zeros_like(self._hidden_buf(m, 1, True)).fill_(1.0), link.next, None, None)
                    return
                t0 = self._tick()
                n = self.rows[m].stop - self.rows[m].start
                x = dec.decode_layers(self.caches[m], dec._embed_tokens(recv[:n].view(n, 1)))
                if flagged:
                    x = torch.cat([x, x.new_zeros(n, 1, 1)], dim=-1)
                self.busy += self._tick() - t0
                nt, nm = (t, m + 1) if m + 1 < M else (t + 1, 0)  # the next item needs step nt - 1's tokens
                recv = self._token_buf(nm, self._flagged(nt, nm)) if nt < T else None
                link.exchange(x.contiguous(), link.next, recv, link.last)

    # ------------------------------------------------------------------------------ later stages
    def _later(self) -> None:
        link, dec, M, T = self.link, self.dec, self.micro, self.max_new
        recv = self._hidden_buf(0, self.width)
        link.exchange(None, None, recv, link.prev)
        stopped = False
        items = [(0, m) for m in range(M)] + [(t, m) for t in range(1, T) for m in range(M)]
        for i, (t, m) in enumerate(items):
            flagged = t >= 1 and self._flagged(t, m)
            if flagged and float(recv[0, 0, -1]) != 0.0:  # stop marker: pass it on, end
                if not dec.last:
                    link.exchange(recv, link.next, None, None)
                return
            out = None
            if not stopped:
                t0 = self._tick()
                x = recv[..., : self.hidden] if flagged else recv
                if t == 0:
                    x = self._prefill(m, x)
                else:
                    x = dec.decode_layers(self.caches[m], x)
                if dec.last:
                    stopped, out = self._sample(t, m, x[:, -1])
                else:
                    out = torch.cat([x, x.new_zeros(x.shape[0], 1, 1)], dim=-1) if flagged else x
                self.busy += self._tick() - t0
            nxt = items[i + 1] if i + 1 < len(items) else None
            recv = None
            if nxt is not None:
                nt, nm = nxt
                recv = self._hidden_buf(nm, self.width if nt == 0 else 1, nt >= 1 and self._flagged(nt, nm))
            dst = link.first if dec.last else link.next
            link.exchange(None if out is None else out.contiguous(), dst, recv, link.prev)

    def _sample(self, t: int, m: int, last_hidden: torch.Tensor):
        """Last stage: logits, sampling, bookkeeping of item (t, m); returns (stopped, token message or None)."""
        dec, s, rec, r = self.dec, self.sampler, self.rec, self.rows[m]
        logits = dec._logits(last_hidden, s.base.vocab_size, gather=not s.base.sharded)
        if m == 0:
            self.noise = s.base.draw()
            if self.gen is not None:
                self.after[t] = self.gen.get_state()
        tok, lp = s.base.sample(logits, None if self.noise is None else self.noise[r])
        s.record(rec, r, t, tok, lp)
        stopped = False
        if m == self.micro - 1 and ((t + 1) % self.every == 0 or t + 1 == self.max_new):
            done, _ = _host_check(rec, self.slots, self.stop_check, self.checked, self.settled, s.base.pad_id)
            stopped = all(done)
            if stopped and self.gen is not None:  # the reference stops sampling at the last row's end
                self.gen.set_state(self.after[int(rec.lengths.max()) - 1])
            self.after = {}
        if t + 1 >= self.max_new:
            return stopped, None  # nothing left to feed
        msg = rec.tok_in[r]
        if m == self.micro - 1 and self._check_step(t):
            msg = torch.cat([msg, torch.tensor([int(stopped)], dtype=torch.long, device=msg.device)])
        return stopped, msg

    # ------------------------------------------------------------------------------------ results
    def _results(self) -> List[tuple]:
        g = self.groups
        ints = torch.empty(self.batch, self.max_new + 3, dtype=torch.long, device=self.device)
        logps = torch.empty(self.batch, self.max_new + 1, dtype=torch.float32, device=self.device)
        if self.dec.last:
            ints[:, : self.max_new + 1] = self.rec.tokens
            ints[:, -2] = self.rec.lengths
            ints[:, -1] = self.rec.done.long()
            logps.copy_(self.rec.logps)
        dist.broadcast(ints, src=g.pp_last_rank, group=g.pp_group)
        dist.broadcast(logps, src=g.pp_last_rank, group=g.pp_group)
        ints, logps = ints.tolist(), logps.tolist()
        out = []
        for r in range(self.batch):
            n = ints[r][-2]
            out.append((ints[r][:n], logps[r][:n], bool(ints[r][-1])))
        return out


def pipeline_generate_rows(engine, prompts, rows, gen, device, *, timing: Optional[dict] = None) -> list:
    """Drop-in for ``RolloutEngine._generate_rows`` at PP > 1 (``engine.groups`` holds the process groups)."""
    from .batch import Rollout, left_pad

    tokens, mask = left_pad([prompts[i].prompt_ids + prefix for i, prefix in rows], engine.pad_id)
    order = list(dict.fromkeys(i for i, _ in rows))  # each prompt's images once (its G rows share them)
    image_rows = [order.index(i) for i, _ in rows]
    pv = [prompts[i].pixel_values for i in order if prompts[i].pixel_values is not None]
    grids = [prompts[i].image_grid_thw for i in order if prompts[i].image_grid_thw is not None]
    row_grids = [prompts[i].image_grid_thw for i, _ in rows if prompts[i].image_grid_thw is not None]
    stop, p = engine.stop, engine.params
    out = pipeline_generate(
        engine.policy, tokens.to(device), mask.to(device), groups=engine.groups,
        pixel_values=torch.cat(pv).to(device) if pv else None,
        image_grid_thw=torch.cat(grids).to(device) if grids else None, image_rows=image_rows if pv else None,
        row_image_grid_thw=torch.cat(row_grids).to(device) if row_grids else None,
        max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p, banned_ids=engine.banned,
        eos_ids=stop.eos_token_ids, stop_check=stop.is_done if stop.stop_strings else None, pad_id=engine.pad_id,
        vocab_size=engine.vocab_size, generator=gen, stop_check_every=getattr(engine, "stop_check_every", 8),
        greedy=bool(getattr(p, "greedy", False)),
        vocab_parallel_sampling=getattr(engine, "vocab_parallel_sampling", False),
        microbatches=getattr(engine, "pp_microbatches", None), timing=timing)
    return [Rollout(prompt_id=i, prompt_tokens=list(prompts[i].prompt_ids), prefix_tokens=list(prefix),
                    generated_tokens=g, rollout_logp=lp, finished=f)
            for (i, prefix), (g, lp, f) in zip(rows, out)]
