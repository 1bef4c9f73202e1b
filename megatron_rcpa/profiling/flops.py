"""Analytic FLOP model of the policy: the decoder (LM), the Qwen2.5-VL vision tower, and the RCPA phases.

Conventions (one multiply-add = 2 FLOPs; only matrix products are counted, as
``torch.utils.flop_counter.FlopCounterMode`` does: norms, activations, RoPE, softmax, biases and the
embedding lookup are not):

**Decoder layer**, per token (``H`` hidden, ``h`` query heads, ``g`` KV heads / query groups, ``d`` head dim,
``F`` FFN size)::

    linear = 2 * (H*h*d + 2*H*g*d + h*d*H + m*H*F)        m = 3 for a gated MLP (SwiGLU), 2 otherwise

**Attention** of ``q`` new queries over ``k`` keys (``k = q`` without a KV cache), per layer: QK^T and
attention x V are each ``2*q*k*d`` per head::

    full   : 4 * h * d * q * k
    causal : 4 * h * d * (q*(k - q) + q*(q + 1)/2)      (only the unmasked query/key pairs)

``full`` is the default because it is what the kernels here actually compute: megatron's local (non-TE)
``DotProductAttention`` (baddbmm + mask + bmm), transformers' eager attention and the SDPA math path all
multiply the whole ``q x k`` score matrix and mask it afterwards, and ``FlopCounterMode`` counts SDPA the same
way. ``causal`` is what a causal flash-attention kernel (TE, FlashAttention) executes, and the convention of
"model FLOPs" in some MFU reports; pick it with ``attention="causal"``. GQA does not reduce attention FLOPs
(K/V are shared, not the score computation).

**LM head**: ``2 * H * V`` per position whose logits are computed (``V`` = the vocabulary the output layer
really has: megatron's padded vocabulary). Tied or untied embeddings do not change this (the embedding
lookup is free; the head is a matmul either way).

A **sequence of length s** (no cache) costs ``L * (s * linear + attention(s, s)) + s * 2*H*V``.

**Vision tower** (transformers ``Qwen2_5_VisionTransformerPretrainedModel``; ``C`` channels, ``T`` temporal
patch, ``P`` patch, hidden ``Hv``, MLP size ``Fv`` (gated), ``M`` spatial merge size, ``O`` output hidden), for
images with grids ``(t, h, w)`` and ``N = sum t*h*w`` patches::

    patch embed (a Conv3d whose kernel equals its stride, i.e. a matmul): 2 * N * (C*T*P*P) * Hv
    per block, linear     : 2 * N * (3*Hv*Hv + Hv*Hv + 3*Hv*Fv)        (qkv, proj, gate/up/down)
    per block, attention  : 4 * Hv * sum(n_i^2) over its attention segments, where the segments are
                            - blocks in ``fullatt_block_indexes``: each frame (h*w patches),
                            - the other blocks: the windows of ``window_size // M // P`` merged patches a
                              side (edge windows smaller), ``M*M`` patches per merged patch, per frame
    patch merger (RMSNorm, Linear(Hv*M*M, Hv*M*M), GELU, Linear(Hv*M*M, O)):
                            2 * (N / M^2) * ((Hv*M*M)^2 + Hv*M*M*O)

transformers runs eager/SDPA vision attention one segment at a time, so only the diagonal blocks are
computed, which is what ``sum(n_i^2)`` counts.

**Training** = 3 x forward: backward computes, for every matmul, the gradient of its input and of its weight,
each as costly as the forward product (no activation recomputation assumed; with full recomputation add one
more forward). The one exception is the patch embedding, whose input (pixels) needs no gradient: 2 x, not
3 x, a negligible difference that :func:`train_flops` accounts for exactly.

**RCPA phases** (:func:`rollout_flops`, :func:`logprob_flops`, :func:`train_flops`):

- rollout: for each row, a prefill forward of its ``p`` prompt tokens (vision tower included; LM-head logits at
  every prompt position, as megatron computes them, or only the last one with ``prefill_logits="last"``),
  then ``n - 1`` decode steps for ``n`` generated tokens: step ``j`` feeds one token and attends over the
  ``p + j`` cached keys: ``L * (linear + attention(1, p + j)) + 2*H*V``. (The first token comes from the
  prefill; the last one is never fed back.)
- log-prob recompute: one forward of each packed sequence for the old policy, plus one for the frozen
  reference when ``beta > 0`` (``passes=2``).
- train: 3 x forward of each packed sequence.

Sequence lengths are the real (unpadded) lengths, so padding is not counted as useful work.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, List, Optional, Sequence, Tuple

__all__ = [
    "ATTENTION_MODES",
    "DecoderShape",
    "VisionShape",
    "attention_flops",
    "logprob_flops",
    "rollout_flops",
    "sequence_forward_flops",
    "train_flops",
    "vlm_forward_flops",
]

ATTENTION_MODES = ("full", "causal")

Grid = Tuple[int, int, int]


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def attention_flops(q: int, k: int, heads: int, head_dim: int, mode: str = "full") -> int:
    """FLOPs of QK^T and attention x V for ``q`` queries over ``k`` keys (the last ``q`` of them are the
    queries' own positions), one layer."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode {mode!r}: expected one of {', '.join(ATTENTION_MODES)}")
    if q < 0 or k < q:
        raise ValueError(f"attention_flops: need 0 <= q <= k, got q={q}, k={k}")
    if mode == "full":
        pairs = q * k
    else:
        pairs = q * (k - q) + q * (q + 1) // 2
    return 4 * heads * head_dim * pairs


@dataclasses.dataclass(frozen=True)
class DecoderShape:
    """The sizes of a decoder-only LM that determine its FLOPs."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int  # the output layer's width (megatron: the padded vocabulary)
    gated_mlp: bool = True
    tied_embeddings: bool = False  # recorded for the report; does not change FLOPs

    @classmethod
    def from_hf_config(cls, config: Any, *, vocab_size: Optional[int] = None) -> DecoderShape:
        """From an HF Qwen2 / Llama / Qwen2.5-VL config (the VL config's ``text_config`` is used) or its dict.
        Qwen2 and Llama MLPs are gated (gate/up/down). ``vocab_size`` overrides the config's (e.g. megatron's
        padded vocabulary)."""
        text = _get(config, "text_config", None) or config
        heads = int(_get(text, "num_attention_heads"))
        hidden = int(_get(text, "hidden_size"))
        kv = _get(text, "num_key_value_heads", None) or heads
        head_dim = _get(text, "head_dim", None) or hidden // heads
        tied = bool(_get(config, "tie_word_embeddings", False) or _get(text, "tie_word_embeddings", False))
        return cls(num_layers=int(_get(text, "num_hidden_layers")), hidden_size=hidden, num_attention_heads=heads,
                   num_query_groups=int(kv), head_dim=int(head_dim),
                   ffn_hidden_size=int(_get(text, "intermediate_size")),
                   vocab_size=int(vocab_size if vocab_size is not None else _get(text, "vocab_size")),
                   gated_mlp=True, tied_embeddings=tied)

    @classmethod
    def from_transformer_config(cls, config: Any, vocab_size: int, *, tied_embeddings: bool = False) -> DecoderShape:
        """From a megatron ``TransformerConfig`` and the output layer's (padded) vocabulary size."""
        heads = int(config.num_attention_heads)
        groups = int(config.num_query_groups or heads)
        head_dim = int(config.kv_channels or config.hidden_size // heads)
        return cls(num_layers=int(config.num_layers), hidden_size=int(config.hidden_size), num_attention_heads=heads,
                   num_query_groups=groups, head_dim=head_dim, ffn_hidden_size=int(config.ffn_hidden_size),
                   vocab_size=int(vocab_size), gated_mlp=bool(config.gated_linear_unit),
                   tied_embeddings=tied_embeddings)

    # ------------------------------------------------------------------------------------------ pieces
    @property
    def layer_matmul_params(self) -> int:
        """Weights of one layer's matrix products (q, k, v, o, MLP)."""
        H, h, g, d, F = (self.hidden_size, self.num_attention_heads, self.num_query_groups, self.head_dim,
                         self.ffn_hidden_size)
        return H * h * d + 2 * H * g * d + h * d * H + (3 if self.gated_mlp else 2) * H * F

    @property
    def matmul_params(self) -> int:
        """All matmul weights touched per token: layers plus the LM head (``2 * this`` = linear FLOPs per token
        with logits)."""
        return self.num_layers * self.layer_matmul_params + self.hidden_size * self.vocab_size

    def lm_head_flops(self, positions: int) -> int:
        return 2 * self.hidden_size * self.vocab_size * positions

    def chunk_flops(self, q: int, k: int, *, logits: Optional[int] = None, attention: str = "full") -> int:
        """Forward FLOPs of ``q`` new tokens of one sequence attending over ``k`` keys (``k - q`` cached),
        with LM-head logits at ``logits`` positions (default: all ``q``)."""
        logits = q if logits is None else logits
        per_layer = 2 * q * self.layer_matmul_params + attention_flops(q, k, self.num_attention_heads,
                                                                        self.head_dim, attention)
        return self.num_layers * per_layer + self.lm_head_flops(logits)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def sequence_forward_flops(decoder: DecoderShape, seq_lens: Iterable[int], attention: str = "full") -> int:
    """Forward FLOPs of the decoder over independent sequences (no cache), logits at every position."""
    return sum(decoder.chunk_flops(int(s), int(s), attention=attention) for s in seq_lens)


# ------------------------------------------------------------------------------------------------ vision
@dataclasses.dataclass(frozen=True)
class VisionShape:
    """The sizes of a Qwen2.5-VL vision tower that determine its FLOPs."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    spatial_merge_size: int
    out_hidden_size: int
    window_size: int
    fullatt_block_indexes: Tuple[int, ...]
    gated_mlp: bool = True

    def __post_init__(self) -> None:  # a list (e.g. from JSON) becomes a tuple: hashable, comparable
        object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))

    @classmethod
    def from_hf_config(cls, config: Any) -> VisionShape:
        """From a ``Qwen2_5_VLConfig`` (its ``vision_config`` is used), a ``Qwen2_5_VLVisionConfig`` or a dict."""
        vision = _get(config, "vision_config", None) or config
        return cls(depth=int(_get(vision, "depth")), hidden_size=int(_get(vision, "hidden_size")),
                   num_heads=int(_get(vision, "num_heads")),
                   intermediate_size=int(_get(vision, "intermediate_size")),
                   patch_size=int(_get(vision, "patch_size", 14)),
                   temporal_patch_size=int(_get(vision, "temporal_patch_size", 2)),
                   in_channels=int(_get(vision, "in_channels", 3)),
                   spatial_merge_size=int(_get(vision, "spatial_merge_size", 2)),
                   out_hidden_size=int(_get(vision, "out_hidden_size")),
                   window_size=int(_get(vision, "window_size", 112)),
                   fullatt_block_indexes=tuple(int(i) for i in _get(vision, "fullatt_block_indexes", ()) or ()),
                   gated_mlp=True)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fullatt_block_indexes"] = list(self.fullatt_block_indexes)
        return d

    @property
    def merged_window(self) -> int:
        """Window side in merged patches (transformers' ``vit_merger_window_size``)."""
        return max(1, self.window_size // self.spatial_merge_size // self.patch_size)

    def num_patches(self, grids: Sequence[Grid]) -> int:
        return sum(int(t) * int(h) * int(w) for t, h, w in grids)

    def num_merged_tokens(self, grids: Sequence[Grid]) -> int:
        """Image tokens the tower hands to the LM: patches / merge^2."""
        return self.num_patches(grids) // self.spatial_merge_size ** 2

    def window_lengths(self, grid: Grid) -> List[int]:
        """Patches in each attention window of one image (all frames), as transformers splits them."""
        t, h, w = (int(x) for x in grid)
        m, ws = self.spatial_merge_size, self.merged_window
        gh, gw = h // m, w // m
        rows = [min(ws, gh - i) for i in range(0, gh, ws)]
        cols = [min(ws, gw - j) for j in range(0, gw, ws)]
        return [r * c * m * m for _ in range(t) for r in rows for c in cols]

    def _segment_square_sum(self, grids: Sequence[Grid], full: bool) -> int:
        if full:
            return sum(int(t) * (int(h) * int(w)) ** 2 for t, h, w in grids)
        return sum(n * n for g in grids for n in self.window_lengths(g))

    def forward_flops(self, grids: Sequence[Grid], attention: str = "full") -> int:
        """Forward FLOPs of the tower on images with patch grids ``grids`` ((t, h, w) each).

        Attention segments are never causal; ``attention`` is accepted for symmetry and must be valid.
        """
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention mode {attention!r}: expected one of {', '.join(ATTENTION_MODES)}")
        grids = [tuple(int(x) for x in g) for g in grids]
        if not grids:
            return 0
        for t, h, w in grids:
            if h % self.spatial_merge_size or w % self.spatial_merge_size:
                raise ValueError(f"image grid (t={t}, h={h}, w={w}): h and w must be multiples of "
                                 f"spatial_merge_size={self.spatial_merge_size}")
        Hv, Fv, m = self.hidden_size, self.intermediate_size, self.spatial_merge_size
        n = self.num_patches(grids)
        flops = self.patch_embed_flops(grids)
        linear = 2 * n * (3 * Hv * Hv + Hv * Hv + (3 if self.gated_mlp else 2) * Hv * Fv)
        full_sq = self._segment_square_sum(grids, full=True)
        window_sq = self._segment_square_sum(grids, full=False)
        for block in range(self.depth):
            squares = full_sq if block in self.fullatt_block_indexes else window_sq
            flops += linear + 4 * Hv * squares
        hm = Hv * m * m
        flops += 2 * (n // (m * m)) * (hm * hm + hm * self.out_hidden_size)
        return flops

    def patch_embed_flops(self, grids: Sequence[Grid]) -> int:
        patch = self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
        return 2 * self.num_patches(grids) * patch * self.hidden_size


def vlm_forward_flops(decoder: DecoderShape, seq_lens: Iterable[int], vision: Optional[VisionShape] = None,
                      grids: Sequence[Grid] = (), attention: str = "full") -> int:
    """Forward FLOPs of a VLM: the vision tower on all images (``grids``) plus the decoder on the sequences
    (image tokens included in ``seq_lens``), logits at every position."""
    flops = sequence_forward_flops(decoder, seq_lens, attention)
    if vision is not None and grids:
        flops += vision.forward_flops(grids, attention)
    return flops


# ------------------------------------------------------------------------------------------------ phases
def rollout_flops(decoder: DecoderShape, prompt_lens: Sequence[int], gen_lens: Sequence[int], *,
                  vision: Optional[VisionShape] = None, grids: Sequence[Grid] = (), attention: str = "full",
                  prefill_logits: str = "all") -> int:
    """FLOPs of generating ``gen_lens[i]`` tokens after prompt ``i`` (``prompt_lens[i]`` tokens, including
    image tokens and a forced prefix) with a KV cache; the vision tower runs once on ``grids`` (all rows'
    images). ``prefill_logits``: "all" prompt positions (megatron's inference path) or "last"."""
    if len(prompt_lens) != len(gen_lens):
        raise ValueError(f"rollout_flops: {len(prompt_lens)} prompt lengths but {len(gen_lens)} generation lengths")
    if prefill_logits not in ("all", "last"):
        raise ValueError(f"prefill_logits={prefill_logits!r}: expected 'all' or 'last'")
    flops = 0
    for p, n in zip(prompt_lens, gen_lens):
        p, n = int(p), int(n)
        if n <= 0:
            continue
        flops += decoder.chunk_flops(p, p, logits=p if prefill_logits == "all" else 1, attention=attention)
        for j in range(1, n):
            flops += decoder.chunk_flops(1, p + j, attention=attention)
    if vision is not None and grids:
        flops += vision.forward_flops(grids, attention)
    return flops


def logprob_flops(decoder: DecoderShape, seq_lens: Sequence[int], *, passes: int = 1,
                  vision: Optional[VisionShape] = None, grids: Sequence[Grid] = (), attention: str = "full") -> int:
    """Forward-only log-prob recompute: ``passes`` = 1 (old policy) or 2 (plus the reference, beta > 0)."""
    return passes * vlm_forward_flops(decoder, seq_lens, vision, grids, attention)


def train_flops(decoder: DecoderShape, seq_lens: Sequence[int], *, vision: Optional[VisionShape] = None,
                grids: Sequence[Grid] = (), attention: str = "full") -> int:
    """Forward + backward = 3 x forward, less the patch embedding's input gradient (pixels need none)."""
    flops = 3 * vlm_forward_flops(decoder, seq_lens, vision, grids, attention)
    if vision is not None and grids:
        flops -= vision.patch_embed_flops(grids)
    return flops
