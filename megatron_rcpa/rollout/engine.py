"""In-process rollouts on the training policy (RCPA_SPEC section 2): no weight copy, same TP/PP layout.

For each prompt i the engine feeds ``prompt ⊕ y*_{1..k_i}`` (the curriculum's forced prefix) and samples G
continuations with temperature / top-p until EOS, a stop string or ``max_new_tokens``. Rows are batched
(left-padded) in chunks of whole groups (``max_rows``: a count, or ``auto``: as many as the KV-cache budget of
:mod:`.budget` holds) and decoded incrementally on the policy's KV cache:

- PP = 1: the policy is called directly (prefill, then one token per step); logits come TP-gathered and
  every TP rank draws the same tokens from a generator seeded by (seed, step, data-parallel rank).
- PP > 1 (``decode="reference"``): each prefill/decode call goes through megatron's schedule (forward only);
  every stage keeps its own cache; the last stage samples and broadcasts the tokens and their log-probs to the
  other stages. ``decode="static"`` (the default) decodes with :mod:`.static_decode` at PP = 1 and with
  :mod:`.static_pipeline` at PP > 1 (rows split into ``pp_microbatches`` micro-batches, default PP, that move
  through the stages in a pipeline).

The policy interface is ``forward(input_ids, attention_mask=, pixel_values=, image_grid_thw=, kv_cache=)`` of
:class:`~megatron_rcpa.models.qwen2_5_vl.Qwen2_5_VLPolicy`, :class:`~megatron_rcpa.models.llava.LlavaPolicy`
and :class:`~megatron_rcpa.models.text_lm.TextLMPolicy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, List, Optional, Sequence, Tuple, Union

import torch

from .batch import Rollout, left_pad
from .sampling import StopChecker, sample_next_tokens


@dataclass
class PromptInput:
    key: Hashable  # identifies the prompt across steps (the curriculum's per-prompt difficulty)
    prompt_ids: List[int]  # chat-formatted prompt incl. image tokens, ending where the response starts
    pixel_values: Optional[torch.Tensor] = None  # [patches, D] of this prompt's images (LLaVA: [images, 3, H, W])
    image_grid_thw: Optional[torch.Tensor] = None  # [images, 3] (Qwen2.5-VL only)
    reference: Optional[str] = None
    reference_ids: Optional[List[int]] = None


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    greedy: bool = False  # argmax instead of sampling (validation); temperature still scales the log-probs


class RolloutEngine:
    """``max_rows``: rows decoded together (chunks of whole groups): an int, or ``"auto"`` (the default) for as
    many as a KV-cache budget holds (:mod:`.budget`: ``kv_cache_gb`` GB when given, else a share of the GPU's
    free memory measured here, or a fixed CPU default). ``compact``: the static path drops finished rows from
    the batch at its host checks (same rollouts either way). ``decode_stats``: set it to a dict to collect the
    static path's counters (decode steps, rows decoded, compactions)."""

    def __init__(self, policy, *, vocab_size: int, pad_id: int, stop: StopChecker, params: SamplingParams,
                 seed: int = 0, max_rows: Union[int, str] = "auto", banned_token_ids: Sequence[int] = (), groups=None,
                 decode: str = "static", stop_check_every: int = 8, kv_cache_gb: Optional[float] = None,
                 compact: bool = True, pp_microbatches: Optional[int] = None) -> None:
        if decode not in ("static", "reference"):
            raise ValueError(f"RolloutEngine decode = {decode!r}: expected 'static' or 'reference'")
        if pp_microbatches is not None and int(pp_microbatches) < 1:
            raise ValueError(f"RolloutEngine pp_microbatches = {pp_microbatches!r}: expected None (= PP) or >= 1")
        if max_rows != "auto" and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"RolloutEngine max_rows = {max_rows!r}: expected 'auto' or an integer >= 1")
        if kv_cache_gb is not None:
            if max_rows != "auto":
                raise ValueError(f"RolloutEngine kv_cache_gb = {kv_cache_gb!r} sizes max_rows = 'auto' only; "
                                 f"max_rows = {max_rows!r}")
            if isinstance(kv_cache_gb, bool) or not isinstance(kv_cache_gb, (int, float)) or not kv_cache_gb > 0:
                raise ValueError(f"RolloutEngine kv_cache_gb = {kv_cache_gb!r}: expected a number > 0 (GB)")
        # static: rollout/static_decode.py (PP = 1), rollout/static_pipeline.py (PP > 1); reference: the loop below
        self.decode = decode
        self.pp_microbatches = None if pp_microbatches is None else int(pp_microbatches)
        self.stop_check_every = int(stop_check_every)
        self.policy = policy
        self._groups = groups  # process groups (megatron_rcpa.runtime.parallel.ParallelGroups); default: megatron's
        self.vocab_size = int(vocab_size)
        self.pad_id = int(pad_id)
        self.stop = stop
        self.params = params
        self.seed = int(seed)
        self.max_rows = max_rows if max_rows == "auto" else int(max_rows)
        self.compact = bool(compact)
        self.decode_stats: Optional[dict] = None
        self.kv_budget: Optional[Tuple[int, str]] = None  # (bytes, how chosen) of max_rows = auto
        if max_rows == "auto":
            from .budget import GB, default_kv_budget

            # measured now: after the model and optimizer exist, before any rollout (same in a resumed run)
            self.kv_budget = ((int(kv_cache_gb * GB), f"rollout.kv_cache_gb = {kv_cache_gb:g}")
                              if kv_cache_gb is not None else default_kv_budget(self._device()))
        self._auto_rows_logged: dict = {}
        # Never sampled: image/video placeholders and other structural tokens would make the sequence
        # ill-formed for the policy's forward (an image token without an image). Masking them shifts the
        # sampling distribution slightly; the logged rollout-vs-training log-prob mismatch shows by how much.
        self.banned = sorted({int(t) for t in banned_token_ids})

    def chunk_rows(self, widths: Sequence[int], group_size: int) -> int:
        """Rows per chunk for rows of these prompt (⊕ prefix) widths: whole groups, at least one group."""
        max_rows = self.max_rows
        if max_rows == "auto":
            from .budget import cache_length, rows_for_budget

            # the static paths (static_decode at PP = 1, static_pipeline at PP > 1) both round the cache up
            length = cache_length(max(widths, default=1), self.params.max_new_tokens, self.decode)
            mp = self.groups.mp_group if self.groups.tp_size * self.groups.pp_size > 1 else None
            budget, how = self.kv_budget
            max_rows = rows_for_budget(self.policy, length, budget, mp)
            if max_rows < group_size:
                raise ValueError(f"rollout.max_rows = auto: the KV-cache budget ({budget / 1e9:.3f} GB: {how}) holds "
                                 f"{max_rows} row(s) of {length} positions, fewer than one group of "
                                 f"rcpa.group_size = {group_size}; raise rollout.kv_cache_gb or set rollout.max_rows")
            if self._auto_rows_logged.get(length) != max_rows:
                self._auto_rows_logged[length] = max_rows
                if self.groups.rank == 0:
                    print(f"[rcpa] rollout.max_rows = auto: {max_rows} rows of {length} cache positions fit the "
                          f"KV-cache budget of {budget / 1e9:.3f} GB ({how})", flush=True)
        return max(group_size, (max_rows // group_size) * group_size)

    # ------------------------------------------------------------------------------------------ public
    @torch.no_grad()
    def generate(self, prompts: Sequence[PromptInput], prefix_lens: Sequence[int], group_size: int,
                 step: int, dp_rank: int = 0) -> List[Rollout]:
        """G rollouts per prompt (consecutive, prompt order kept), each starting with its forced prefix."""
        rows = []
        for i, (p, k) in enumerate(zip(prompts, prefix_lens)):
            if k and (p.reference_ids is None or k > len(p.reference_ids)):
                raise ValueError(f"prompt {p.key!r}: forced prefix of {k} tokens but the reference has "
                                 f"{0 if p.reference_ids is None else len(p.reference_ids)}")
            prefix = list(p.reference_ids[:k]) if k else []
            rows += [(i, prefix)] * group_size
        device = self._device()
        gen = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + step * 1_009 + dp_rank)
        out: List[Rollout] = []
        chunk = self.chunk_rows([len(prompts[i].prompt_ids) + len(prefix) for i, prefix in rows], group_size)
        was_training = self.policy.training
        self.policy.eval()  # inference mode (megatron 0.16's KV-cache path requires it without TE)
        try:
            for start in range(0, len(rows), chunk):
                out += self._generate_rows(prompts, rows[start:start + chunk], gen, device)
        finally:
            self.policy.train(was_training)
        return out

    # ---------------------------------------------------------------------------------------- internals
    @property
    def groups(self):
        if self._groups is None:
            from megatron_rcpa.train.step import resolve_groups

            self._groups = resolve_groups()
        return self._groups

    def _device(self) -> torch.device:
        return next(self.policy.parameters()).device

    def _forward(self, cache, **inputs) -> Optional[torch.Tensor]:
        """Last-position logits [B, V] on the last stage (None on other stages)."""
        if self.groups.pp_size == 1:
            return self.policy(kv_cache=cache, **inputs)[:, -1, : self.vocab_size].float()
        from megatron_rcpa.models.pipeline import pipeline_forward

        b, s = inputs["input_ids"].shape
        outs = pipeline_forward(self.policy, [dict(inputs, kv_cache=cache)], seq_length=s, micro_batch_size=b)
        return None if outs is None else outs[0][:, -1, : self.vocab_size].float()

    def _sample(self, logits: Optional[torch.Tensor], batch: int, gen, device):
        p = self.params
        if logits is not None:
            if self.banned:
                logits = logits.clone()
                logits[:, self.banned] = float("-inf")
            tok, lp = sample_next_tokens(logits, temperature=p.temperature, top_p=p.top_p, generator=gen,
                                         greedy=p.greedy)
        else:
            tok = torch.zeros(batch, dtype=torch.long, device=device)
            lp = torch.zeros(batch, dtype=torch.float32, device=device)
        if self.groups.pp_size > 1:
            packed = torch.stack([tok.double(), lp.double()])
            torch.distributed.broadcast(packed, src=self.groups.pp_last_rank, group=self.groups.pp_group)
            tok, lp = packed[0].long(), packed[1].float()
        return tok, lp

    @property
    def tp_group(self):
        return self.groups.tp_group if self.groups.tp_size > 1 else None

    def _generate_rows(self, prompts, rows, gen, device) -> List[Rollout]:
        if self.decode == "static":
            from megatron_rcpa.models.parallel_knobs import sequence_parallel_off

            with sequence_parallel_off(self.policy):  # decoding runs without it (parallel.sequence_parallel)
                if self.groups.pp_size == 1:
                    from .static_decode import static_generate_rows

                    return static_generate_rows(self, prompts, rows, gen, device)
                from .static_pipeline import pipeline_generate_rows

                return pipeline_generate_rows(self, prompts, rows, gen, device)
        tokens, mask = left_pad([prompts[i].prompt_ids + prefix for i, prefix in rows], self.pad_id)
        b, width = tokens.shape
        pv = [prompts[i].pixel_values for i, _ in rows if prompts[i].pixel_values is not None]
        grids = [prompts[i].image_grid_thw for i, _ in rows if prompts[i].image_grid_thw is not None]
        inputs = dict(input_ids=tokens.to(device), attention_mask=mask.to(device))
        if pv:
            inputs["pixel_values"] = torch.cat(pv).to(device)
        if grids:  # Qwen2.5-VL patches come with their grids; LLaVA images have one fixed size
            inputs["image_grid_thw"] = torch.cat(grids).to(device)

        from megatron_rcpa.models.inference import KVCache

        max_new = self.params.max_new_tokens
        cache = KVCache(b, width + max_new)
        logits = self._forward(cache, **inputs)
        completions: List[List[int]] = [[] for _ in range(b)]
        logps: List[List[float]] = [[] for _ in range(b)]
        done = [False] * b
        for t in range(max_new):
            tok, lp = self._sample(logits, b, gen, device)
            tok_l, lp_l = tok.tolist(), lp.tolist()
            for r in range(b):
                if not done[r]:
                    completions[r].append(tok_l[r])
                    logps[r].append(lp_l[r])
                    done[r] = self.stop.is_done(completions[r])
            if all(done) or t + 1 == max_new:
                break
            step_in = torch.tensor([self.pad_id if d else x for d, x in zip(done, tok_l)], dtype=torch.long)
            logits = self._forward(cache, input_ids=step_in[:, None].to(device),
                                   attention_mask=torch.ones(b, 1, dtype=torch.long, device=device))
        return [Rollout(prompt_id=i, prompt_tokens=list(prompts[i].prompt_ids), prefix_tokens=list(prefix),
                        generated_tokens=completions[r], rollout_logp=logps[r], finished=done[r])
                for r, (i, prefix) in enumerate(rows)]
