"""Static-shape rollout decoding on the training policy's own weights (issue 12): no per-token host sync.

Contract (one chunk of rows, the same as ``RolloutEngine._generate_rows`` computes per chunk)::

    results = static_generate(
        policy,                         # TextLMPolicy / LlavaPolicy / Qwen2_5_VLPolicy, PP = 1, any TP
        input_ids,                      # [B, W] long, LEFT-padded prompt ⊕ forced prefix (as the engine builds it)
        attention_mask,                 # [B, W] (1 = token, 0 = left padding)
        pixel_values=None,              # the rows' images in row order (Qwen2.5-VL patches / LLaVA images)
        image_grid_thw=None,            # Qwen2.5-VL only
        image_rows=None,                # optional: row -> distinct prompt; pixel_values / image_grid_thw then
                                        # hold each distinct prompt's images ONCE (encoded once, shared by rows)
        max_new_tokens=64, temperature=1.0, top_p=1.0,
        banned_ids=(),                  # never sampled (-inf before the softmax, as the engine does)
        eos_ids=(),                     # end a row on the device
        stop_check=None,                # host callable(completion: list[int]) -> bool (StopChecker.is_done)
        pad_id=0, vocab_size=V,         # V: the real vocabulary (padded columns dropped)
        generator=gen,                  # torch.Generator on the policy's device, seeded identically on TP ranks
        tp_group=None,                  # the policy's TP group (required when TP > 1)
        stop_check_every=8,             # host stop-string check period, in tokens
        greedy=False,                   # argmax instead of sampling (tests)
        vocab_parallel_sampling=False,  # top_p = 1 only: draw from each rank's logits shard (Gumbel-max) with
                                        # [B]-sized collectives instead of gathering [B, V] logits
        compact=True,                   # move live rows to smaller batch buckets at host checks
        stats=None,                     # optional dict: decode_steps, row_steps, compactions, ... added
    ) -> list of (generated_tokens: list[int], rollout_logp: list[float], finished: bool), one per row

:func:`static_generate_rows` wraps it with ``RolloutEngine._generate_rows``' exact signature and return
value (``List[Rollout]``), so the engine can call ``static_generate_rows(self, prompts, rows, gen, device)``
in place of its per-token loop.

What it computes is what the reference loop computes, token for token (same processed distribution, same
generator draws, same pad-feeding of finished rows, same final generator state when every row finishes
early), but:

* the weights are the policy's parameter tensors, read in place at call time (never copied): embedding,
  per layer the input norm, ``linear_qkv``, attention, ``linear_proj``, the pre-MLP norm, the SwiGLU MLP,
  the final norm and the output layer (tied or not);
* the KV cache is preallocated, ``[B, kv_heads/TP, L, head_dim]`` per layer (L = prompt width + max new
  tokens, rounded up to :data:`LENGTH_BUCKET`), with keys stored after rotary and written at per-row slots;
  attention is ``scaled_dot_product_attention`` over the whole fixed length with a boolean key mask, so no
  shape changes between steps. GQA without copies: in a decode step the ``q_heads/kv_heads`` query heads
  of a group attend as a group (query ``[B, kv_heads, q_per_kv, d]`` against keys ``[B, kv_heads, L, d]``);
  the prefill uses ``enable_gqa=True``;
* positions are one integer per row in decode: the column for RoPE models (left padding counted, as the
  policy's forward does) and, for Qwen2.5-VL, ``max(prompt MRoPE position) + 1 + t`` — with equal temporal,
  height and width positions MRoPE is plain RoPE (tests/rollout/test_static_decode.py proves it against
  megatron's ``MultimodalRotaryEmbedding``), so decode is a cos/sin table lookup;
* the prefill runs the decoder over the prompt once and computes the output layer for the LAST position
  only; with ``image_rows`` each prompt's images go through the vision tower once and its G rows share the
  features (scattered by the policy's own ``_embed_with_images``; :func:`static_generate_rows` does this);
* sampling stays on the device (:func:`~megatron_rcpa.rollout.sampling.sample_next_tokens`, the function the
  reference calls, on the TP-gathered last-position logits); EOS and the finished state are device tensors;
  finished rows are fed ``pad_id`` (as in the reference);
* the host looks at the tokens every ``stop_check_every`` steps and at the end (stop strings: the first
  length at which ``stop_check`` holds, searched only when it holds for the whole completion so far, i.e.
  assuming a stop string, once decoded, stays in the text; rows that ended on EOS since the last check are
  searched too; all rows done: stop early);
* compaction (``compact=True``, the default): at a host check, when the live rows fit a smaller batch bucket
  (:func:`batch_buckets`: the chunk's size, then the powers of two below it), they are gathered into the first
  slots of the same storage (KV cache, key mask, positions, inputs, finished state; one device gather per
  buffer) and decoding goes on at that bucket, with its own captured graph, so finished rows stop costing
  compute. Never a per-token sync: only at the host checks. The random draw does not depend on which rows are
  left: every step still draws the whole chunk's ``[B, V]`` exponentials (the draw ``torch.multinomial`` makes)
  and each row reads its own row of them, so tokens and the generator's state are those without compaction
  (log-probs agree to rounding: a GEMM's result for a row can change with the number of rows multiplied);
* on CUDA (``use_cuda_graph`` default: ``torch.cuda.is_available()``) the decode step (all layers, output
  layer, TP gather, sampling, bookkeeping) is captured once per (batch size, cache length, weight storage)
  in a ``torch.cuda.CUDAGraph`` per batch bucket (all on one storage, sharing one memory pool) and
  replayed; on a CPU it runs eagerly. The graph path has not run yet (no
  GPU where it was written): :mod:`bench.bench_rollout` exercises it.

With ``vocab_parallel_sampling=True`` (top-p = 1) the TP ranks sample from their own logits shards
(:mod:`.vocab_parallel_sampling`: the same exponential draws as ``multinomial``, Gumbel-max per shard, three
[B]-sized collectives) instead of gathering ``[B, V]`` logits every step.

Not covered here: pipeline parallelism (PP > 1 raises here; :mod:`.static_pipeline` runs the same
:class:`StaticDecoder` layers per stage with micro-batches, without compaction), sequence parallelism, refilling
freed slots with waiting rows (the next chunk's rows would draw from a different generator state than without
refill).
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .sampling import draw_exponentials, sample_next_tokens

__all__ = ["LENGTH_BUCKET", "MAX_GRAPHS", "StaticDecoder", "batch_buckets", "decoder_for", "shared_image_embed",
           "static_generate", "static_generate_rows"]

#: Cache lengths are rounded up to a multiple of this, so that chunks with slightly different prompt widths
#: share one CUDA graph (extra columns are masked keys).
LENGTH_BUCKET = 64

#: Captured graph sets kept per decoder (least recently used dropped first); each owns the KV cache of its
#: shape and one graph per batch bucket.
MAX_GRAPHS = 4

#: A new graph set is allocated only with this multiple of its KV cache free (older sets are dropped first).
GRAPH_MEMORY_MARGIN = 1.25

RowResult = Tuple[List[int], List[float], bool]


def _round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    x1, x2 = torch.chunk(t, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """megatron's unfused, non-interleaved RoPE (``_apply_rotary_pos_emb_bshd``) with precomputed cos/sin."""
    return (t * cos) + (_rotate_half(t) * sin)


class StaticDecoder:
    """The decode machinery for one policy and TP group: the whole model (PP = 1), or with ``pipeline_stage``
    one pipeline stage of it (its local layers; the embedding on the first stage, the final norm and output
    layer on the last), driven by :mod:`.static_pipeline`.

    Holds no weight copies: every call reads the policy's modules. Holds the CUDA graphs (keyed by batch
    size, cache length and the weights' storage addresses, so an optimizer that rebinds ``param.data``
    triggers a new capture) and the cos/sin tables.
    """

    def __init__(self, policy, tp_group=None, *, pipeline_stage: bool = False) -> None:
        lm = policy.language_model
        cfg = lm.config
        self.first = bool(getattr(policy, "pre_process", True))  # embeds (and encodes images)
        self.last = bool(getattr(policy, "post_process", True))  # final norm, output layer, sampling
        if not pipeline_stage and not (self.first and self.last):
            raise ValueError("static_generate runs the whole model on one stage (PP=1); this policy is one stage "
                             f"of a pipeline (pre_process={policy.pre_process}, post_process={policy.post_process}): "
                             "use megatron_rcpa.rollout.static_pipeline")
        if cfg.sequence_parallel:
            raise ValueError("static_generate: sequence_parallel=True is not supported (the decode path gathers "
                             "nothing along the sequence)")
        if getattr(cfg, "qk_layernorm", False) or getattr(cfg, "multi_latent_attention", False):
            raise ValueError("static_generate: qk_layernorm / multi-latent attention are not supported")
        if cfg.rotary_interleaved:
            raise ValueError("static_generate: rotary_interleaved=True is not supported (HF Qwen2/Llama rotate_half)")
        if cfg.gated_linear_unit is not True:
            raise ValueError("static_generate: only gated (SwiGLU) MLPs are supported")
        kind = lm.position_embedding_type
        if kind not in ("rope", "mrope"):
            raise ValueError(f"static_generate: position_embedding_type={kind!r}; expected 'rope' or 'mrope'")
        tp = 1 if tp_group is None else dist.get_world_size(tp_group)
        if tp != cfg.tensor_model_parallel_size:
            raise ValueError(f"static_generate: tp_group has {tp} rank(s) but the policy was built with "
                             f"tensor_model_parallel_size={cfg.tensor_model_parallel_size}; pass the policy's TP "
                             "group (megatron parallel_state.get_tensor_model_parallel_group())")
        self._policy = weakref.ref(policy)
        self.tp_group = tp_group if tp > 1 else None
        self.tp = tp
        self.mrope = kind == "mrope"
        self.heads = cfg.num_attention_heads // tp
        self.groups = (cfg.num_query_groups or cfg.num_attention_heads) // tp
        self.q_per_kv = self.heads // self.groups
        self.head_dim = cfg.kv_channels
        self.scale = cfg.softmax_scale if getattr(cfg, "softmax_scale", None) else self.head_dim ** -0.5
        self.num_layers = len(lm.decoder.layers)  # this stage's layers (all of them at PP = 1)
        self._graphs: Dict[tuple, _CapturedStep] = {}

    # -------------------------------------------------------------------------------------- weights
    @property
    def policy(self):
        policy = self._policy()
        if policy is None:
            raise RuntimeError("the policy of this StaticDecoder was garbage-collected")
        return policy

    def _output_weight(self) -> torch.Tensor:
        lm = self.policy.language_model
        if lm.share_embeddings_and_output_weights:
            return lm.shared_embedding_or_output_weight()
        return lm.output_layer.weight

    def weight_key(self) -> tuple:
        """Storage addresses of every parameter the decode step reads (a captured graph is only valid for them)."""
        return tuple(p.data_ptr() for p in self.policy.language_model.parameters())

    # ----------------------------------------------------------------------------------- building blocks
    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_group is not None:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def _embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, S] ids -> [B, S, H]: megatron's VocabParallelEmbedding (masked local lookup + all-reduce)."""
        emb = self.policy.language_model.embedding.word_embeddings
        if self.tp_group is None:
            return F.embedding(ids, emb.weight)
        outside = (ids < emb.vocab_start_index) | (ids >= emb.vocab_end_index)
        local = (ids - emb.vocab_start_index).masked_fill(outside, 0)
        out = F.embedding(local, emb.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return self._all_reduce(out)

    @staticmethod
    def _linear(x: torch.Tensor, module) -> torch.Tensor:
        bias = getattr(module, "bias", None)
        out = F.linear(x, module.weight)
        return out if bias is None else out + bias

    def _row_parallel(self, x: torch.Tensor, module) -> torch.Tensor:
        out = self._all_reduce(F.linear(x, module.weight))  # bias after the reduction, as megatron adds it
        bias = getattr(module, "bias", None)
        return out if bias is None else out + bias

    def _qkv(self, layer, h: torch.Tensor):
        """[B, S, H] -> q [B, S, heads, d], k, v [B, S, groups, d] (megatron's per-group q..q k v layout)."""
        b, s, _ = h.shape
        qkv = self._linear(h, layer.self_attention.linear_qkv).view(b, s, self.groups, self.q_per_kv + 2,
                                                                    self.head_dim)
        q = qkv[:, :, :, : self.q_per_kv].reshape(b, s, self.heads, self.head_dim)
        return q, qkv[:, :, :, self.q_per_kv], qkv[:, :, :, self.q_per_kv + 1]

    def _mlp(self, layer, x: torch.Tensor) -> torch.Tensor:
        h = layer.pre_mlp_layernorm(x)
        gate, up = torch.chunk(self._linear(h, layer.mlp.linear_fc1), 2, dim=-1)
        act = layer.mlp.config.activation_func(gate) * up
        return x + self._row_parallel(act, layer.mlp.linear_fc2)

    def _logits(self, x: torch.Tensor, vocab_size: int, gather: bool = True) -> torch.Tensor:
        """[B, H] last hidden state -> [B, vocab_size] fp32 logits, gathered over TP (``gather=False``: this
        rank's [B, V_padded / TP] shard, for :func:`~.vocab_parallel_sampling.sample_vocab_parallel`)."""
        lm = self.policy.language_model
        local = F.linear(lm.decoder.final_layernorm(x), self._output_weight())
        if not gather:
            return local.float()
        if self.tp_group is not None:
            parts = [torch.empty_like(local) for _ in range(self.tp)]
            dist.all_gather(parts, local.contiguous(), group=self.tp_group)
            local = torch.cat(parts, dim=-1)
        return local[:, :vocab_size].float()

    # --------------------------------------------------------------------------------------- tables
    def rope_table(self, length: int, device, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, head_dim] of positions 0..length-1 (megatron's ``inv_freq``; fp32, then cast)."""
        inv_freq = self.policy.language_model.rotary_pos_emb.inv_freq.to(device=device, dtype=torch.float32)
        freqs = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return torch.cos(emb).to(dtype), torch.sin(emb).to(dtype)

    # -------------------------------------------------------------------------------------- prefill
    def _prefill_input(self, input_ids, pixel_values, image_grid_thw, image_rows):
        """[B, W, H] decoder input of the prompt (images scattered in by the policy's own embedding code), and
        the per-row image grids (Qwen2.5-VL positions need them; with ``image_rows`` they are repeated here)."""
        from megatron_rcpa.models.llava import LlavaPolicy
        from megatron_rcpa.models.qwen2_5_vl import Qwen2_5_VLPolicy

        policy = self.policy
        vlm = isinstance(policy, (Qwen2_5_VLPolicy, LlavaPolicy))
        if isinstance(policy, LlavaPolicy) and image_grid_thw is not None:
            raise ValueError("a LLaVA policy takes no image_grid_thw")
        if not vlm and (pixel_values is not None or image_grid_thw is not None):
            raise ValueError(f"{type(policy).__name__} takes no images (pixel_values/image_grid_thw given)")
        if image_rows is not None and pixel_values is not None:
            emb, image_grid_thw = shared_image_embed(policy, input_ids, pixel_values, image_grid_thw, image_rows)
        elif isinstance(policy, Qwen2_5_VLPolicy):
            emb = policy.embed(input_ids, pixel_values, image_grid_thw, strict=True)
        elif isinstance(policy, LlavaPolicy):
            emb = policy.embed(input_ids, pixel_values, strict=True)
        else:
            emb = policy.language_model.embedding(input_ids=input_ids, position_ids=None)
        return emb.transpose(0, 1), image_grid_thw

    def _prefill_positions(self, input_ids, attention_mask, image_grid_thw, table):
        """(cos, sin) [B, W, 1, d] of the prompt and the [B] RoPE position of the first generated token."""
        b, w = input_ids.shape
        if not self.mrope:
            cos, sin = table
            return cos[:w].view(1, w, 1, -1), sin[:w].view(1, w, 1, -1), torch.full(
                (b,), w, dtype=torch.long, device=input_ids.device)
        from megatron_rcpa.models.mrope import next_positions

        policy = self.policy
        lm = policy.language_model
        pos = policy.position_ids(input_ids, image_grid_thw, attention_mask)  # [3, B, W]
        emb = lm.rotary_pos_emb(pos, mrope_section=lm.config.mrope_section)  # [W, B, 1, d]
        dtype = table[0].dtype
        emb = emb.transpose(0, 1)
        return torch.cos(emb).to(dtype), torch.sin(emb).to(dtype), next_positions(pos, attention_mask)

    def prefill(self, state: _State, input_ids, attention_mask, pixel_values, image_grid_thw,
                vocab_size: int, image_rows: Optional[Sequence[int]] = None, gather: bool = True) -> torch.Tensor:
        """Fill the cache with the prompt; returns the last position's logits [B, vocab_size] (fp32).
        ``image_rows``: see :func:`static_generate`."""
        x, image_grid_thw = self._prefill_input(input_ids, pixel_values, image_grid_thw, image_rows)
        cos, sin, next_pos = self._prefill_positions(input_ids, attention_mask, image_grid_thw, state.table)
        x = self.prefill_layers(state, x, cos, sin, attention_mask, next_pos)
        return self._logits(x[:, -1], vocab_size, gather)

    def prefill_layers(self, state, x: torch.Tensor, cos, sin, attention_mask, next_pos) -> torch.Tensor:
        """This stage's layers over the prompt: [B, W, H] hidden states in and out; fills ``state``'s cache
        (``k``/``v`` per local layer) and sets its key mask, next slot and next RoPE position. ``cos``/``sin``
        and ``next_pos`` come from :meth:`_prefill_positions` (every stage computes them itself)."""
        b, w = attention_mask.shape
        key_ok = attention_mask.to(torch.bool)
        causal = torch.ones(w, w, dtype=torch.bool, device=x.device).tril()
        # a padding query attends to itself too: no fully masked row (NaN); its output is never read
        allowed = (causal & key_ok[:, None, :]) | torch.eye(w, dtype=torch.bool, device=x.device)
        allowed = allowed[:, None]  # [B, 1, W, W]
        for i, layer in enumerate(self.policy.language_model.decoder.layers):
            q, k, v = self._qkv(layer, layer.input_layernorm(x))
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
            state.k[i][:, :, :w] = k.transpose(1, 2)
            state.v[i][:, :, :w] = v.transpose(1, 2)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=allowed, scale=self.scale,
                                                 enable_gqa=self.q_per_kv > 1)
            out = out.transpose(1, 2).reshape(b, w, self.heads * self.head_dim)
            x = self._mlp(layer, x + self._row_parallel(out, layer.self_attention.linear_proj))
        state.valid.zero_()
        state.valid[:, :w] = key_ok
        state.col.fill_(w)
        state.rope_pos.copy_(next_pos)
        return x

    # ---------------------------------------------------------------------------------------- decode
    def decode_logits(self, state: _State, vocab_size: int, gather: bool = True) -> torch.Tensor:
        """One token per row (``state.tok_in``) at cache slot ``state.col`` and RoPE position ``state.rope_pos``;
        returns [B, vocab_size] fp32 logits and advances ``col`` / ``rope_pos``. Static shapes throughout."""
        b = state.tok_in.shape[0]
        x = self.decode_layers(state, self._embed_tokens(state.tok_in.view(b, 1)))  # [B, 1, H]
        return self._logits(x[:, 0], vocab_size, gather)

    def decode_layers(self, state, x: torch.Tensor) -> torch.Tensor:
        """This stage's layers for one token per row: [B, 1, H] in and out, cache slot ``state.col`` and RoPE
        position ``state.rope_pos`` (both advanced by one). Static shapes throughout."""
        b = x.shape[0]
        cos = state.table[0].index_select(0, state.rope_pos).view(b, 1, 1, -1)
        sin = state.table[1].index_select(0, state.rope_pos).view(b, 1, 1, -1)
        slot = state.col.view(b, 1, 1, 1).expand(b, self.groups, 1, self.head_dim)
        state.valid.scatter_(1, state.col.view(b, 1), True)
        mask = state.valid.view(b, 1, 1, -1)
        for i, layer in enumerate(self.policy.language_model.decoder.layers):
            q, k, v = self._qkv(layer, layer.input_layernorm(x))
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
            state.k[i].scatter_(2, slot, k.transpose(1, 2))
            state.v[i].scatter_(2, slot, v.transpose(1, 2))
            # the q_per_kv query heads of a group attend as one group: no K/V expansion
            qg = q.view(b, self.groups, self.q_per_kv, self.head_dim)
            out = F.scaled_dot_product_attention(qg, state.k[i], state.v[i], attn_mask=mask, scale=self.scale)
            out = out.reshape(b, 1, self.heads * self.head_dim)
            x = self._mlp(layer, x + self._row_parallel(out, layer.self_attention.linear_proj))
        state.col.add_(1)
        state.rope_pos.add_(1)
        return x

    def step(self, state: _State, sampler: _Sampler) -> None:
        """Decode step t >= 1: forward the previous tokens, sample, record (all on the device)."""
        sampler.sample_and_record(state, self.decode_logits(state, sampler.vocab_size, gather=not sampler.sharded))

    # ------------------------------------------------------------------------------------ CUDA graphs
    def graph_for(self, batch: int, length: int, max_new: int, device, dtype, sampler: _Sampler) -> _CapturedStep:
        """The captured decode step (with its static buffers) for this shape, sampling setup and weight
        storage; captured on first use. Its sampler draws from a generator owned by the graph, whose state is
        copied from / back to the caller's generator around each use."""
        key = (batch, length, max_new, str(device), dtype, sampler.key, self.weight_key())
        graph = self._graphs.pop(key, None)
        if graph is None:
            # drop graphs of stale weights, then the least recently used beyond MAX_GRAPHS (each holds a KV cache)
            self._graphs = {k: g for k, g in self._graphs.items() if k[:6] != key[:6]}
            while len(self._graphs) >= MAX_GRAPHS:
                self._graphs.pop(next(iter(self._graphs)))
            torch.cuda.empty_cache()
            # and older ones while the new KV cache would not fit (rollout.max_rows = auto sizes it to the memory)
            need = 2 * self.num_layers * batch * self.groups * length * self.head_dim * dtype.itemsize
            while self._graphs and torch.cuda.mem_get_info(device)[0] < GRAPH_MEMORY_MARGIN * need:
                self._graphs.pop(next(iter(self._graphs)))
                torch.cuda.empty_cache()
            graph = _CapturedStep(self, _State(self, batch, length, max_new, device, dtype), sampler)
        self._graphs[key] = graph  # most recently used last
        return graph


def shared_image_embed(policy, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                       image_grid_thw: Optional[torch.Tensor], image_rows: Sequence[int]):
    """[S, B, H] decoder input with each prompt's images encoded ONCE and shared by its rows.

    ``pixel_values`` (and, for Qwen2.5-VL, ``image_grid_thw``) hold the images of the distinct prompts
    0..U-1, each prompt's images once, in that order; ``image_rows[r]`` is the prompt of row ``r``. Returns
    the embeddings (scattered by the policy's own ``_embed_with_images``) and the per-row grids (Qwen2.5-VL
    positions) or None.
    """
    from megatron_rcpa.models.llava import LlavaPolicy

    image_rows = [int(u) for u in image_rows]
    b = input_ids.shape[0]
    if len(image_rows) != b:
        raise ValueError(f"image_rows has {len(image_rows)} entries for {b} rows")
    image_id = policy.image_token_id
    counts = (input_ids == image_id).sum(dim=1).tolist()
    unique = max(image_rows) + 1
    tokens_of = [-1] * unique
    for r, u in enumerate(image_rows):
        if u < 0:
            raise ValueError(f"image_rows[{r}] = {u} must be >= 0")
        if tokens_of[u] not in (-1, counts[r]):
            raise ValueError(f"rows of prompt {u} hold different numbers of image tokens ({tokens_of[u]} vs "
                             f"{counts[r]} in row {r}): image_rows must map rows to the prompt they repeat")
        tokens_of[u] = counts[r]
    if -1 in tokens_of:
        raise ValueError(f"image_rows {image_rows} skips prompt {tokens_of.index(-1)}; expected 0..U-1 all used")
    row_grids = None
    if isinstance(policy, LlavaPolicy):
        feats = policy.image_features(pixel_values)
        feats = feats.reshape(-1, feats.shape[-1])
    else:
        if image_grid_thw is None:
            raise ValueError("pixel_values given without image_grid_thw")
        grid = image_grid_thw.reshape(-1, 3).long()
        vision_dtype = next(policy.vision_model.parameters()).dtype
        feats = policy.vision_model(pixel_values.to(vision_dtype), grid_thw=grid).pooler_output
        per_image = (grid.prod(dim=1) // policy.spatial_merge_size ** 2).tolist()
        images_of, i = [], 0
        for need in tokens_of:  # a prompt's images are consecutive
            start = i
            while need > 0 and i < len(per_image):
                need -= per_image[i]
                i += 1
            if need:
                raise ValueError(f"image_grid_thw {grid.tolist()} does not split into the prompts' image tokens "
                                 f"{tokens_of}")
            images_of.append(list(range(start, i)))
        row_grids = grid[[j for u in image_rows for j in images_of[u]]]
    if feats.shape[0] != sum(tokens_of):
        raise ValueError(f"the prompts hold {sum(tokens_of)} image tokens but their images gave {feats.shape[0]} "
                         "features")
    start = torch.tensor([0] + tokens_of[:-1], device=feats.device).cumsum(0).tolist()
    index = torch.cat([torch.arange(start[u], start[u] + tokens_of[u], device=feats.device) for u in image_rows])
    row_feats = feats.index_select(0, index)

    def features(n: int) -> torch.Tensor:
        if n != row_feats.shape[0]:
            raise ValueError(f"input_ids hold {n} image tokens, the rows' images {row_feats.shape[0]}")
        return row_feats

    return policy._embed_with_images(input_ids, image_id, pixel_values, features, strict=True), row_grids


def batch_buckets(batch: int) -> List[int]:
    """The batch sizes a chunk of ``batch`` rows decodes at: ``batch`` itself, then every power of two below it
    (compaction moves the live rows to the smallest bucket that holds them; one CUDA graph per bucket)."""
    out, n = [int(batch)], 1
    while n < batch:
        n *= 2
    n //= 2
    while n >= 1:
        if n < batch:
            out.append(n)
        n //= 2
    return out


def _bucket_for(live: int, batch: int) -> int:
    """The smallest bucket of :func:`batch_buckets` (``batch``) that holds ``live`` rows."""
    return min(n for n in batch_buckets(batch) if n >= max(live, 1))


class _State:
    """Static device buffers of one chunk of ``rows`` rows: KV cache, key mask, per-slot position / input /
    finished state, and the outputs.

    The batch is made of *slots*: slot ``s`` holds original row ``row_id[s]``. Per-slot buffers (KV cache,
    ``valid``, ``col``, ``rope_pos``, ``tok_in``, ``done``, ``lengths``, ``row_id``) are read by the decode step
    for slots ``0 .. batch-1``; :meth:`compact` moves chosen slots to the front and returns the view of the
    first ``n`` slots (same storage: no new KV cache). The outputs ``tokens`` / ``logps`` are indexed by
    original row and never move.
    """

    SLOT_BUFFERS = ("valid", "col", "rope_pos", "tok_in", "done", "lengths", "row_id")

    def __init__(self, dec: StaticDecoder, batch: int, length: int, max_new: int, device, dtype) -> None:
        self.batch = self.rows = batch
        self.length, self.max_new = length, max_new
        shape = (batch, dec.groups, length, dec.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(dec.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(dec.num_layers)]
        self.valid = torch.zeros(batch, length, dtype=torch.bool, device=device)
        self.col = torch.zeros(batch, dtype=torch.long, device=device)
        self.rope_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.tok_in = torch.zeros(batch, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.row_id = torch.arange(batch, dtype=torch.long, device=device)
        self.t = torch.zeros((), dtype=torch.long, device=device)  # index of the next token to record
        self.tokens = torch.zeros(batch, max_new + 1, dtype=torch.long, device=device)  # +1: overflow column
        self.logps = torch.zeros(batch, max_new + 1, dtype=torch.float32, device=device)
        # RoPE positions never exceed the cache length (text: the column; MRoPE: max position + 1 <= width)
        self.table = dec.rope_table(length, device, dtype)
        self.base = self

    def narrow(self, n: int) -> _State:
        """The view of slots ``0 .. n-1`` (shares every buffer with the storage)."""
        base = self.base
        if not 1 <= n <= base.batch:
            raise ValueError(f"_State.narrow: {n} slots of a storage of {base.batch}")
        view = object.__new__(_State)
        view.__dict__.update(base.__dict__)
        view.batch = n
        view.k, view.v = [k[:n] for k in base.k], [v[:n] for v in base.v]
        for name in self.SLOT_BUFFERS:
            setattr(view, name, getattr(base, name)[:n])
        return view

    def compact(self, keep: Sequence[int]) -> _State:
        """Slots ``keep`` (of this view, in that order) moved to slots ``0 .. len(keep)-1``; returns that view.
        One gather per buffer (the KV cache layer by layer), on the device."""
        base, n = self.base, len(keep)
        idx = torch.tensor(list(keep), dtype=torch.long, device=self.col.device)
        for name in self.SLOT_BUFFERS:
            getattr(base, name)[:n].copy_(getattr(self, name).index_select(0, idx))
        for src, dst in zip(self.k + self.v, base.k + base.v):
            dst[:n].copy_(src.index_select(0, idx))
        return base.narrow(n)

    def reset(self) -> None:
        base = self.base
        for buf in (base.valid, base.col, base.rope_pos, base.tok_in, base.t, base.done, base.lengths, base.tokens,
                    base.logps):
            buf.zero_()
        base.row_id.copy_(torch.arange(base.batch, device=base.row_id.device))


class _Sampler:
    """Sampling + bookkeeping of one step, device-only (same processed distribution as the reference).

    The random draw is the one of the whole chunk (``batch`` rows) whatever slots remain: each slot reads the
    noise row of its original row (``state.row_id``), so dropping finished rows changes no token."""

    def __init__(self, *, batch: int, vocab_size: int, temperature: float, top_p: float, greedy: bool,
                 banned_ids: Sequence[int], eos_ids: Sequence[int], pad_id: int, generator, device,
                 shard: Optional[Tuple[int, int, object]] = None) -> None:
        if not greedy and temperature <= 0:
            raise ValueError(f"static_generate: temperature = {temperature} must be > 0 (or greedy=True)")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"static_generate: top_p = {top_p} must be in (0, 1]")
        self.rows = int(batch)
        self.vocab_size, self.temperature, self.top_p, self.greedy = int(vocab_size), float(temperature), \
            float(top_p), bool(greedy)
        self.generator = generator
        banned = sorted({int(t) for t in banned_ids})
        bad = [t for t in banned if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"static_generate: banned_ids {bad} are outside the vocabulary [0, {vocab_size})")
        self.banned = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        if banned:
            self.banned[torch.tensor(banned, dtype=torch.long, device=device)] = True
        self.any_banned = bool(banned)
        self.eos = torch.tensor(sorted({int(t) for t in eos_ids}) or [-1], dtype=torch.long, device=device)
        self.pad_id = int(pad_id)
        # shard = (vocab_start, local width, tp_group): sample from this rank's logits shard, no gather
        self.sharded = shard is not None
        if self.sharded:
            if top_p < 1.0:
                raise ValueError(f"static_generate: vocab_parallel_sampling needs top_p = 1 (got {top_p}): top-p "
                                 "sorts the whole distribution")
            self.vocab_start, width, self.tp_group = shard
            cols = torch.arange(self.vocab_start, self.vocab_start + width, device=device)
            self.local_banned = torch.zeros(width, dtype=torch.bool, device=device)
            inside = cols < vocab_size
            self.local_banned[inside] = self.banned[cols[inside]]
        self.key = (self.vocab_size, self.temperature, self.top_p, self.greedy, tuple(banned),
                    tuple(self.eos.tolist()), self.pad_id, self.sharded)

    def draw(self) -> Optional[torch.Tensor]:
        """[batch, vocab_size] exponentials of one step for the whole chunk (None when greedy: nothing drawn)."""
        if self.greedy:
            return None
        return draw_exponentials(self.rows, self.vocab_size, self.generator, self.banned.device)

    def sample(self, logits: torch.Tensor, noise: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Tokens and log-probs of the rows of ``logits``; ``noise``: those rows' rows of :meth:`draw`."""
        if self.sharded:
            from .vocab_parallel_sampling import sample_vocab_parallel

            return sample_vocab_parallel(logits, vocab_start=self.vocab_start, vocab_size=self.vocab_size,
                                         temperature=self.temperature, greedy=self.greedy, generator=None,
                                         masked=self.local_banned if self.any_banned else None,
                                         tp_group=self.tp_group, noise=noise)
        if self.any_banned:
            logits = logits.masked_fill(self.banned, float("-inf"))
        if self.greedy:
            return sample_next_tokens(logits, temperature=1.0, greedy=True)
        return sample_next_tokens(logits, temperature=self.temperature, top_p=self.top_p, noise=noise)

    def sample_and_record(self, state: _State, logits: torch.Tensor) -> None:
        noise = self.draw()
        tok, lp = self.sample(logits, None if noise is None else noise.index_select(0, state.row_id))
        live = ~state.done
        # rows still going record at column t of their original row; finished ones write the overflow column
        col = torch.where(live, state.t, state.max_new)
        flat = state.row_id * (state.max_new + 1) + col
        state.tokens.view(-1).scatter_(0, flat, tok)
        state.logps.view(-1).scatter_(0, flat, lp)
        state.lengths.add_(live.long())
        state.done.logical_or_(live & torch.isin(tok, self.eos))
        state.tok_in.copy_(torch.where(state.done, torch.full_like(tok, self.pad_id), tok))
        state.t.add_(1)


class _CapturedStep:
    """The decode step captured in CUDA graphs on one storage (:class:`_State`), one graph per batch bucket
    (:func:`batch_buckets`: the chunk, then the powers of two compaction moves to); the graphs share the
    storage, the sampler, its generator (owned here) and one memory pool (they never run concurrently and
    hand nothing to each other outside the static buffers). CUDA only; not yet run: no GPU where it was written."""

    def __init__(self, dec: StaticDecoder, state: _State, sampler: _Sampler) -> None:
        self.state = state
        self.sampler = sampler
        sampler.generator = torch.Generator(device=state.tokens.device)  # owned by the graphs
        self.graphs: Dict[int, torch.cuda.CUDAGraph] = {}
        pool = None
        for n in batch_buckets(state.batch):
            view = state if n == state.batch else state.narrow(n)
            state.reset()  # warm-up steps write cache columns / token slots from a clean state
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up (allocations, lazy inits) outside the graph
                for _ in range(2):
                    dec.step(view, sampler)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(sampler.generator)
            with torch.cuda.graph(graph, pool=pool):
                dec.step(view, sampler)
            pool = graph.pool()
            self.graphs[n] = graph
        state.reset()  # the prefill rewrites the cache columns it uses; later ones are masked until written

    def replay(self, batch: int) -> None:
        self.graphs[batch].replay()


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_for(policy, tp_group=None) -> StaticDecoder:
    """The (cached) :class:`StaticDecoder` of ``policy`` and ``tp_group``."""
    per_policy = _DECODERS.setdefault(policy, {})
    key = id(tp_group) if tp_group is not None else None
    if key not in per_policy:
        per_policy[key] = StaticDecoder(policy, tp_group)
    return per_policy[key]


def _first_stop(completion: List[int], checked: int, stop_check: Callable[[List[int]], bool]) -> int:
    """The shortest length > ``checked`` at which ``stop_check`` holds (0 if none up to the full completion)."""
    if not stop_check(completion):
        return 0
    for n in range(checked + 1, len(completion) + 1):
        if stop_check(completion[:n]):
            return n
    return len(completion)


@torch.no_grad()
def static_generate(
    policy,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    pixel_values: Optional[torch.Tensor] = None,
    image_grid_thw: Optional[torch.Tensor] = None,
    image_rows: Optional[Sequence[int]] = None,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    banned_ids: Sequence[int] = (),
    eos_ids: Sequence[int] = (),
    stop_check: Optional[Callable[[List[int]], bool]] = None,
    pad_id: int,
    vocab_size: int,
    generator: Optional[torch.Generator] = None,
    tp_group=None,
    stop_check_every: int = 8,
    greedy: bool = False,
    vocab_parallel_sampling: bool = False,
    use_cuda_graph: Optional[bool] = None,
    compact: bool = True,
    stats: Optional[dict] = None,
) -> List[RowResult]:
    """Generate up to ``max_new_tokens`` per row; see the module docstring for the contract.

    Every TP rank calls it with the same arguments and an identically seeded ``generator``; all return the
    same rows. ``stop_check`` sees a row's completion so far (it must also say True after an EOS, as
    ``StopChecker.is_done`` does, or ignore it: EOS is handled on the device).

    ``compact``: at each host check, move the live rows to the smallest batch bucket that holds them
    (:func:`batch_buckets`), so finished rows stop costing compute; the results are the same either way.
    ``stats``: a dict to which the call adds ``chunks``, ``rows``, ``decode_steps`` (steps after the prefill),
    ``row_steps`` (rows decoded summed over those steps) and ``compactions`` ((step, from, to) per compaction).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"static_generate: input_ids must be [B, W], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"static_generate: max_new_tokens = {max_new_tokens} must be >= 1")
    if stop_check_every < 1:
        raise ValueError(f"static_generate: stop_check_every = {stop_check_every} must be >= 1")
    dec = decoder_for(policy, tp_group)
    weight = dec._output_weight()
    device, dtype = weight.device, weight.dtype
    b, w = input_ids.shape
    input_ids = input_ids.to(device)
    attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).to(device)
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)
    if image_grid_thw is not None:
        image_grid_thw = image_grid_thw.to(device)
    length = _round_up(w + max_new_tokens, LENGTH_BUCKET)
    shard = None
    if vocab_parallel_sampling:
        width = weight.shape[0]  # this rank's rows of the (padded) output layer
        shard = ((0 if dec.tp_group is None else dist.get_rank(dec.tp_group)) * width, width, dec.tp_group)
    sampler = _Sampler(batch=b, vocab_size=vocab_size, temperature=temperature, top_p=top_p, greedy=greedy,
                       banned_ids=banned_ids, eos_ids=eos_ids, pad_id=pad_id, generator=generator, device=device,
                       shard=shard)
    if use_cuda_graph is None:
        use_cuda_graph = torch.cuda.is_available() and device.type == "cuda"
    was_training = policy.training
    policy.eval()
    try:
        graph = None
        if use_cuda_graph and max_new_tokens > 1:
            graph = dec.graph_for(b, length, max_new_tokens, device, dtype, sampler)
            state, sampler = graph.state, graph.sampler
            state.reset()
            if generator is not None:
                sampler.generator.set_state(generator.get_state())
        else:
            state = _State(dec, b, length, max_new_tokens, device, dtype)
        out = _run(dec, state, sampler, graph, input_ids, attention_mask, pixel_values, image_grid_thw, image_rows,
                   stop_check=stop_check, every=int(stop_check_every), compact=bool(compact), stats=stats)
        if graph is not None and generator is not None:
            generator.set_state(sampler.generator.get_state())
        return out
    finally:
        policy.train(was_training)


def _run(dec, state, sampler, graph, input_ids, attention_mask, pixel_values, image_grid_thw, image_rows, *,
         stop_check, every, compact, stats) -> List[RowResult]:
    full = state
    max_new, b = state.max_new, state.batch
    gen = sampler.generator
    logits = dec.prefill(state, input_ids, attention_mask, pixel_values, image_grid_thw, sampler.vocab_size,
                         image_rows, gather=not sampler.sharded)
    # generator state after each step since the last host check (to hand back the reference's final state)
    after: Dict[int, object] = {}
    checked = [0] * b  # completion length already searched for a stop string, per original row
    settled: set = set()  # original rows found finished at a host check (their length is final)
    slots = list(range(b))  # the original row each slot of the batch holds
    final: Dict[int, Tuple[int, bool]] = {}  # original row -> (length, finished), rows dropped by compaction
    sampler.sample_and_record(state, logits)  # step 0 from the prefill logits
    t, row_steps, compactions = 0, 0, []
    while True:
        if gen is not None:
            after[t] = gen.get_state()
        last = t + 1 == max_new
        if last or (t + 1) % every == 0:
            done, lengths = _host_check(state, slots, stop_check, checked, settled, sampler.pad_id)
            all_done = all(done)
            if all_done or last:
                if all_done and gen is not None:  # the reference stops sampling at the last row's end
                    gen.set_state(after[max(lengths) - 1])
                break
            after = {}  # a row still going here ends after this step: older states are not needed
            if compact:
                live = [s for s in range(state.batch) if not done[s]]
                n = _bucket_for(len(live), b)
                if n < state.batch:  # live rows first, then finished ones to fill the bucket
                    keep = live + [s for s in range(state.batch) if done[s]][: n - len(live)]
                    kept = set(keep)
                    for s in range(state.batch):
                        if s not in kept:
                            final[slots[s]] = (lengths[s], done[s])
                    compactions.append((t + 1, state.batch, n))
                    state = state.compact(keep)
                    slots = [slots[s] for s in keep]
        t += 1
        if graph is not None:
            graph.replay(state.batch)
        else:
            dec.step(state, sampler)
        row_steps += state.batch
    for s, r in enumerate(slots):
        final[r] = (lengths[s], done[s])
    if stats is not None:
        stats["chunks"] = stats.get("chunks", 0) + 1
        stats["rows"] = stats.get("rows", 0) + b
        stats["decode_steps"] = stats.get("decode_steps", 0) + t
        stats["row_steps"] = stats.get("row_steps", 0) + row_steps
        stats.setdefault("compactions", []).extend(compactions)
    tokens, logps = full.tokens.tolist(), full.logps.tolist()
    return [(tokens[r][: final[r][0]], logps[r][: final[r][0]], bool(final[r][1])) for r in range(b)]


def _host_check(state: _State, slots: List[int], stop_check, checked: List[int], settled: set,
                pad_id: int) -> Tuple[List[bool], List[int]]:
    """One transfer of the finished flags and lengths (per slot); stop strings on the host (a second transfer:
    the tokens of the rows not settled yet, i.e. live at the previous check: a row that ended on EOS since then
    may hold a stop string before its EOS); returns the updated (finished, lengths) per slot. ``settled``
    (original rows whose end is final) grows by the rows found finished."""
    done_l = torch.stack([state.done.long(), state.lengths]).tolist()
    done, lengths = [bool(d) for d in done_l[0]], done_l[1]
    if stop_check is not None:
        open_ = [s for s in range(state.batch) if slots[s] not in settled]
        if open_:
            device = state.done.device
            tokens = state.tokens.index_select(0, torch.tensor([slots[s] for s in open_], device=device)).tolist()
            ended = {}
            for s, row in zip(open_, tokens):
                r = slots[s]
                n = _first_stop(row[: lengths[s]], checked[r], stop_check)
                checked[r] = lengths[s]
                if n and (not done[s] or n < lengths[s]):
                    ended[s] = n
            if ended:
                idx = sorted(ended)
                rows = torch.tensor(idx, dtype=torch.long, device=device)
                state.done[rows] = True
                state.lengths[rows] = torch.tensor([ended[s] for s in idx], dtype=torch.long, device=device)
                state.tok_in[rows] = pad_id  # fed pad from now on, as the reference does
                for s in idx:
                    done[s], lengths[s] = True, ended[s]
    settled.update(slots[s] for s in range(state.batch) if done[s])
    return done, lengths


def static_generate_rows(engine, prompts, rows, gen, device) -> list:
    """Drop-in for ``RolloutEngine._generate_rows(prompts, rows, gen, device)``: same inputs (left padding,
    images in row order), same ``List[Rollout]``; uses ``engine.tp_group`` when set, else megatron's TP group."""
    from megatron.core import parallel_state as ps

    from .batch import Rollout, left_pad

    tokens, mask = left_pad([prompts[i].prompt_ids + prefix for i, prefix in rows], engine.pad_id)
    # each prompt's images once (its G rows share the encoded features)
    order = list(dict.fromkeys(i for i, _ in rows))
    image_rows = [order.index(i) for i, _ in rows]
    pv = [prompts[i].pixel_values for i in order if prompts[i].pixel_values is not None]
    grids = [prompts[i].image_grid_thw for i in order if prompts[i].image_grid_thw is not None]
    tp_group = getattr(engine, "tp_group", None)
    if tp_group is None and ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
        tp_group = ps.get_tensor_model_parallel_group()
    stop = engine.stop
    p = engine.params
    out = static_generate(
        engine.policy, tokens.to(device), mask.to(device),
        pixel_values=torch.cat(pv).to(device) if pv else None,
        image_grid_thw=torch.cat(grids).to(device) if grids else None, image_rows=image_rows if pv else None,
        max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p, banned_ids=engine.banned,
        eos_ids=stop.eos_token_ids, stop_check=stop.is_done if stop.stop_strings else None, pad_id=engine.pad_id,
        vocab_size=engine.vocab_size, generator=gen, tp_group=tp_group,
        stop_check_every=getattr(engine, "stop_check_every", 8), greedy=bool(getattr(p, "greedy", False)),
        vocab_parallel_sampling=getattr(engine, "vocab_parallel_sampling", False),
        compact=getattr(engine, "compact", True), stats=getattr(engine, "decode_stats", None))
    return [Rollout(prompt_id=i, prompt_tokens=list(prompts[i].prompt_ids), prefix_tokens=list(prefix),
                    generated_tokens=g, rollout_logp=lp, finished=f)
            for (i, prefix), (g, lp, f) in zip(rows, out)]
