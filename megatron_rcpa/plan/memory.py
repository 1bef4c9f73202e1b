"""Per-GPU memory of an RCPA run, by pipeline stage: what ``rcpa-plan`` prints.

Everything is in bytes, per GPU (one TP rank of one pipeline stage of one data-parallel replica), from the
code paths this project runs (megatron-core's *local* layer spec, no Transformer Engine):

**Resident for the whole run**

- weights: the stage's parameters in ``model.dtype`` (embedding on the first stage, output layer on the last
  -- also on the last stage when tied and PP > 1, where megatron keeps a synchronised copy --, the final norm
  on the last, the vision tower on the first: replicated over TP for Qwen2.5-VL (its HF tower is not
  TP-sharded), TP-sharded for LLaVA whose frozen unused tower tensors are buffers);
- grads: megatron DDP's grad buffer, fp32 (``grad_reduce_in_fp32=True`` as ``build_step_context`` sets);
- optimizer: Adam's m and v in fp32, plus an fp32 master copy of bf16 parameters (12 bytes/param for bf16,
  8 for fp32), divided by DP with ``parallel.distributed_optimizer``;
- reference: a second copy of the weights when ``rcpa.loss.beta > 0``.

**Training activations** (the update and the forward-only log-prob passes). Per decoder layer and
micro-batch of ``b`` rows x ``s`` tokens (``H`` hidden, ``h``/``g`` query/KV heads, ``d`` head dim, ``F``
FFN size, ``t`` TP, ``e`` bytes of ``model.dtype``), the tensors autograd saves on megatron's local spec
(measured on CPU with ``saved_tensors_hooks``; tests/plan checks this model against that count):

- each RMSNorm (torch's, computed in fp32) + the linear after it: ``s*b*H*(8 + e)`` + fp32 ``rstd``;
- attention: q and k after RoPE and v, repeated to ``h`` heads for GQA (``3*s*b*h*d/t*e``), the RoPE
  cos/sin (``4*s*b*d*e``, per row for MRoPE), the softmax output in fp32 and (bf16) the probabilities
  cast back (``b*h/t*s^2*(4 + 2)``: the local spec materialises the whole score matrix), the causal mask
  (``s^2`` bytes), the projection's input (``s*b*h*d/t*e``);
- MLP (SwiGLU): fc1's output (``2F``), silu's output, the product and fc2's input (``5*s*b*F/t*e`` in all).

With ``parallel.sequence_parallel`` the norm terms are divided by ``t``. Recompute (``model.recompute_*``):
``selective`` checkpoints core attention (q, k, v kept, no score matrices); ``full``/``uniform`` keeps one
hidden state (``s*b*H*e``) per chunk of ``recompute_num_layers`` layers and recomputes one chunk at a time
in backward (that chunk's activations are added once as a transient); ``full``/``block`` recomputes the
first ``recompute_num_layers`` layers of each stage and keeps the others.
Under 1F1B, stage ``i`` of ``pp`` holds ``min(pp - i, n_micro)`` micro-batches in flight (1 without PP).
Pipeline stages also keep the received input and the sent output (``s*b*H*e``) of each in-flight micro-batch.
The first stage adds the vision tower's activations (Qwen2.5-VL: every row of a micro-batch carries its own
copy of its prompt's image patches; planner-only options: ``model.vision_recompute``, HF gradient
checkpointing of its blocks, and ``model.freeze_vision``) and the last stage the loss on the logits:
``b*s*V/t`` in ``e`` (logits) plus fp32 working copies (log-softmax and its gradient), for one micro-batch at a time.

**Rollout** (decoding on the training policy; not at the same time as training activations):

- KV cache: ``rows x (prompt + max_new_tokens) x layers-on-stage x 2 x max(g/t, 1) x d x e``, ``rows`` the
  rollout engine's chunk (``rollout.max_rows`` rounded to whole groups; ``auto``, the default: the rows whose KV
  cache fits ``rollout.kv_cache_gb``, else 0.5 x the memory left after weights, grads and optimizer);
- prefill logits on the last stage: the decode path gathers the logits over TP and megatron materialises every
  position: ``rows x prompt x V`` in ``e`` for the gathered tensor and again for the padded-vocabulary mask,
  plus the local ``V/t`` shard;
- prefill transient: one layer's forward temporaries for all rows (the score matrices dominate), plus the
  vision tower's for all rows' images on the first stage (each row carries its own copy of its prompt's
  images). These two are estimates; the saved-for-backward terms above are measured.

The peak is resident + the largest of (training activations, rollout). The checkpoint on disk is the model in
``model.dtype`` plus the optimizer's fp32 master + m + v (``run.keep_last`` of them are kept).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Tuple

from megatron_rcpa.plan.shapes import ModelShape

__all__ = ["GPUS", "PlanInputs", "StageMemory", "Plan", "plan_memory", "stage_layer_counts", "stage_params",
           "decoder_layer_activation_bytes", "decoder_layer_forward_bytes", "vision_activation_bytes",
           "vision_forward_bytes", "GiB"]

GiB = float(1 << 30)
#: usable device memory, bytes (what torch.cuda.mem_get_info reports as total on these parts)
GPUS: Dict[str, float] = {
    "h100-80gb": 79.1 * GiB,
    "h200-141gb": 139.8 * GiB,
    "a100-80gb": 79.2 * GiB,
}
_BYTES = {"bf16": 2, "fp32": 4}


@dataclasses.dataclass(frozen=True)
class PlanInputs:
    shape: ModelShape
    tp: int = 1
    pp: int = 1
    dp: int = 1
    dtype: str = "bf16"
    distributed_optimizer: bool = False
    sequence_parallel: bool = False
    recompute_granularity: Optional[str] = None  # None | full | selective
    recompute_method: Optional[str] = None  # uniform | block (full only)
    recompute_num_layers: Optional[int] = None
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None
    micro_batch_size: int = 8  # rows per micro-batch (optim.micro_batch_size, capped at the rows per rank)
    num_micro_batches: int = 1  # per optimizer step on this data-parallel rank
    train_seq_len: int = 2048  # padded tokens per training row (prompt + forced prefix + generation)
    prompt_len: int = 1024  # padded prompt tokens at prefill (image tokens included)
    max_new_tokens: int = 1024
    images_per_row: int = 1
    image_tokens: int = 0  # per image (Qwen2.5-VL: patches / spatial_merge^2; LLaVA: fixed)
    rollout_rows: int = 64  # rows decoded together (one KV cache)
    reference: bool = False  # rcpa.loss.beta > 0
    vision_recompute: bool = False  # HF gradient checkpointing of the vision tower's blocks
    freeze_vision: bool = False  # vision tower frozen: no grads, no optimizer states, run without autograd
    gpu_mem_bytes: float = GPUS["h100-80gb"]

    def __post_init__(self) -> None:
        if self.dtype not in _BYTES:
            raise ValueError(f"model.dtype = {self.dtype!r}: expected one of {sorted(_BYTES)}")
        for name in ("tp", "pp", "dp", "micro_batch_size", "num_micro_batches", "train_seq_len", "prompt_len",
                     "rollout_rows"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} = {getattr(self, name)!r}: expected an integer >= 1")

    @property
    def e(self) -> int:
        return _BYTES[self.dtype]


# ------------------------------------------------------------------------------------------------ layout
def stage_layer_counts(num_layers: int, pp: int, first: Optional[int] = None, last: Optional[int] = None
                       ) -> List[int]:
    """Decoder layers per pipeline stage, as megatron assigns them: ``first``/``last`` stage counts when
    given (uneven PP), the remaining layers split evenly over the other stages."""
    if pp == 1:
        return [num_layers]
    counts: List[Optional[int]] = [None] * pp
    if first is not None:
        counts[0] = int(first)
    if last is not None:
        counts[-1] = int(last)
    fixed = sum(c for c in counts if c is not None)
    free = [i for i, c in enumerate(counts) if c is None]
    rest = num_layers - fixed
    if any(c is not None and c < 1 for c in counts) or rest < 0:
        raise ValueError(f"parallel.num_layers_in_first/last_pipeline_stage = {first}/{last} do not fit "
                         f"{num_layers} layers on PP={pp} stages")
    if free:
        if rest % len(free) or rest // len(free) < 1:
            raise ValueError(f"the {rest} layers left after the first/last stage ({first}/{last}) do not split "
                             f"evenly over the {len(free)} middle stages (num_hidden_layers = {num_layers}, PP={pp})")
        for i in free:
            counts[i] = rest // len(free)
    elif rest:
        raise ValueError(f"first + last stage layers ({first} + {last}) != num_hidden_layers = {num_layers} at PP=2")
    return [int(c) for c in counts]


def _layer_params(shape: ModelShape, tp: int) -> int:
    """Parameters of one decoder layer on one TP rank (local spec: norms replicated, linears sharded)."""
    d = shape.dims
    qkv_out = (d.num_attention_heads + 2 * d.num_kv_heads) * d.head_dim
    sharded = (d.hidden_size * qkv_out + (qkv_out if d.qkv_bias else 0)
               + d.num_attention_heads * d.head_dim * d.hidden_size
               + 3 * d.hidden_size * d.ffn_hidden_size)  # fc1 (gate + up) and fc2
    return sharded // tp + 2 * d.hidden_size


def stage_params(shape: ModelShape, tp: int, pp: int, stage: int, layers: int) -> Tuple[int, int]:
    """(trainable parameters, frozen buffer elements) on one TP rank of pipeline stage ``stage``."""
    d = shape.dims
    n = layers * _layer_params(shape, tp)
    embedding = shape.padded_vocab_size * d.hidden_size // tp
    frozen = 0
    if stage == 0:
        n += embedding
        if shape.vision is not None:
            n += shape.vision.params_per_rank(tp)
            frozen += shape.vision.frozen_numel
    if stage == pp - 1:
        n += d.hidden_size  # final norm
        if not shape.tied or pp > 1:  # untied head, or the tied copy megatron keeps on the last stage
            n += embedding
    return n, frozen


# ------------------------------------------------------------------------------------------- activations
def _recompute_check(inp: PlanInputs) -> None:
    g, m, n = inp.recompute_granularity, inp.recompute_method, inp.recompute_num_layers
    if g not in (None, "full", "selective"):
        raise ValueError(f"model.recompute_granularity = {g!r}: expected None, 'full' or 'selective'")
    if g == "full" and (m not in ("uniform", "block") or not n or n < 1):
        raise ValueError(f"model.recompute_granularity = 'full' needs model.recompute_method in (uniform, block) "
                         f"and model.recompute_num_layers >= 1 (got {m!r}, {n!r})")


def decoder_layer_activation_bytes(shape: ModelShape, b: int, s: int, tp: int, e: int, *,
                                   sequence_parallel: bool = False, selective: bool = False) -> float:
    """Bytes one decoder layer saves for backward for a micro-batch of ``b`` rows x ``s`` tokens (no full
    recompute; ``selective``: core attention recomputed). See the module docstring for each term."""
    d = shape.dims
    hidden, heads, kv, hd, ffn = d.hidden_size, d.num_attention_heads, d.num_kv_heads, d.head_dim, d.ffn_hidden_size
    sp = tp if sequence_parallel else 1
    sb = s * b
    norms = 2 * (sb * hidden * (8 + e) + 4 * sb) / sp
    q_heads = heads * hd / tp
    kv_heads = kv * hd / tp
    qkv_storage = sb * (q_heads + 2 * kv_heads) * e
    rope = 4 * s * (b if shape.mrope else 1) * hd * e
    if selective:  # checkpointed core attention keeps its inputs: rotated q and k, v (a view of the qkv output)
        attn = sb * (q_heads + kv_heads) * e + qkv_storage
        scores = 0.0
    else:
        rotated = sb * (q_heads + (q_heads if heads > kv else kv_heads)) * e  # k repeated to h heads for GQA
        value = sb * q_heads * e if heads > kv else qkv_storage
        attn = rotated + value
        # softmax in fp32 (attention_softmax_in_fp32), cast back to the activation dtype for the bmm (not in fp32)
        scores = b * (heads / tp) * s * s * (4 + (e if e != 4 else 0)) + s * s
    context = sb * q_heads * e
    mlp = 5 * sb * ffn / tp * e
    return norms + attn + rope + scores + context + mlp


def vision_activation_bytes(shape: ModelShape, patches: int, tp: int, e: int, *, images: int = 1,
                            recompute: bool = False) -> float:
    """Bytes the vision tower saves for backward for ``patches`` patches (all images of a micro-batch).

    Qwen2.5-VL (HF tower, flash/SDPA attention per window: no score matrices), per block: two RMSNorms
    (fp32 compute: 12 bytes/element in fp32, ``4 + 2e`` in bf16) with their linears' inputs, the qkv output, q and
    k after RoPE, the attention output and the projection's input (``7*N*Hv*e``), the gated MLP's gate, up, silu
    and product (``4*N*F*e``) and the attention log-sum-exp; plus the pixels (``N*patch_dim*e``), the RoPE
    tables and the patch merger. ``recompute`` (HF gradient checkpointing of the blocks, Qwen2.5-VL): each block
    keeps only its input (``N*Hv*e``). LLaVA (megatron ViT, TP-sharded): the decoder formula's terms for a
    LayerNorm / GELU-MLP layer with full attention over each image (not measured)."""
    v = shape.vision
    if v is None or patches <= 0:
        return 0.0
    n, hv, fv = patches, v.hidden_size, v.ffn_hidden_size
    if v.kind == "qwen2_5_vl":
        norm = n * hv * (12 if e == 4 else 4 + 2 * e) + 4 * n
        block = 2 * norm + 7 * n * hv * e + 4 * n * fv * e + 4 * n * v.num_heads
        fixed = n * v.patch_dim * e + norm + 2 * n * hv * e
        if recompute:
            return v.depth * n * hv * e + fixed
        return v.depth * block + fixed + 2 * n * v.head_dim * 4  # + the RoPE tables
    # LLaVA ViT: per layer, LayerNorm input + its linear's input, q/k/v, scores per image, context, GELU MLP
    seq = n // max(images, 1)
    norm = 2 * (n * hv * 2 * e + 8 * n)
    attn = 3 * n * hv / tp * e + images * (v.num_heads / tp) * seq * seq * (4 + e) + n * hv / tp * e
    mlp = 2 * n * fv / tp * e
    return v.depth * (norm + attn + mlp) + n * v.patch_dim * e


def decoder_layer_forward_bytes(shape: ModelShape, b: int, s: int, tp: int, e: int) -> float:
    """Peak temporaries of one decoder layer's forward without autograd (prefill, log-prob passes): the layer's
    input and output plus its largest intermediate (the fp32 scores and probabilities, the MLP's fc1/silu
    outputs, or a norm's fp32 copies). An estimate, not measured."""
    d = shape.dims
    sb = s * b
    scores = b * (d.num_attention_heads / tp) * s * s * (4 + e)
    mlp = 3 * sb * d.ffn_hidden_size / tp * e
    norm = 8 * sb * d.hidden_size
    return 2 * sb * d.hidden_size * e + max(scores, mlp, norm)


def vision_forward_bytes(shape: ModelShape, patches: int, tp: int, e: int, *, images: int = 1) -> float:
    """Peak temporaries of the vision tower's forward without autograd: its pixels and one block's
    activations (the saved-for-backward bytes of one block bound its temporaries). An estimate."""
    v = shape.vision
    if v is None or patches <= 0:
        return 0.0
    one_block = dataclasses.replace(shape, vision=dataclasses.replace(v, depth=1))
    return vision_activation_bytes(one_block, patches, tp, e, images=images)


def _stage_activations(inp: PlanInputs, layers: int, b: int, s: int, *, first: bool, last: bool
                       ) -> Tuple[float, float]:
    """(saved bytes of one in-flight micro-batch on this stage, transient bytes of the recompute in backward)."""
    shape, e, tp = inp.shape, inp.e, inp.tp
    sp = tp if inp.sequence_parallel else 1
    full_layer = decoder_layer_activation_bytes(shape, b, s, tp, e, sequence_parallel=inp.sequence_parallel,
                                                selective=inp.recompute_granularity == "selective")
    hidden_state = s * b * shape.dims.hidden_size * e / sp
    transient = 0.0
    if inp.recompute_granularity == "full":
        n = inp.recompute_num_layers
        if inp.recompute_method == "uniform":
            chunks = math.ceil(layers / n)
            saved = chunks * hidden_state + s * (b if shape.mrope else 1) * shape.dims.head_dim * 4  # + RoPE freqs
            transient = min(n, layers) * full_layer
        else:  # block: the first n layers of the stage recomputed, the rest kept
            k = min(n, layers)
            saved = k * hidden_state + (layers - k) * full_layer
            transient = full_layer if k else 0.0
    else:
        saved = layers * full_layer
    d = shape.dims
    if first:
        saved += 8 * s * b  # token ids kept by the embedding
    if last:
        saved += (s * b * d.hidden_size * (8 + e) + 4 * s * b) / sp  # final norm + the output layer's input
        saved += shape.padded_vocab_size / tp if shape.padded_vocab_size != d.vocab_size else 0  # padded-vocab mask
    if not first:
        saved += hidden_state  # the received activation
    if not last:
        saved += hidden_state  # the sent activation (not deallocated by the schedule)
    return saved, transient


def _loss_bytes(inp: PlanInputs, b: int, s: int) -> float:
    """The last stage's logits and the loss's fp32 working copies (log-softmax and its gradient)."""
    width = inp.shape.padded_vocab_size / inp.tp
    return b * s * width * (inp.e + 8)


# --------------------------------------------------------------------------------------------- the plan
@dataclasses.dataclass
class StageMemory:
    stage: int
    layers: int
    params: int  # trainable, one TP rank
    frozen: int
    weights: float
    grads: float
    optimizer: float
    reference: float
    in_flight: int
    activations: float  # training: saved x in flight + recompute transient + vision + loss
    vision_activations: float
    loss: float
    kv_cache: float
    prefill_logits: float
    prefill_transient: float

    @property
    def resident(self) -> float:
        return self.weights + self.grads + self.optimizer + self.reference

    @property
    def rollout(self) -> float:
        return self.kv_cache + self.prefill_logits + self.prefill_transient

    @property
    def peak(self) -> float:
        return self.resident + max(self.activations, self.rollout)

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(resident=self.resident, rollout=self.rollout, peak=self.peak)
        return out


@dataclasses.dataclass
class Plan:
    inputs: PlanInputs
    stages: List[StageMemory]
    checkpoint_bytes: float  # model + optimizer on disk
    model_checkpoint_bytes: float
    total_params: int
    notes: List[str]

    @property
    def peak(self) -> float:
        return max(s.peak for s in self.stages)

    @property
    def fits(self) -> bool:
        return self.peak <= self.inputs.gpu_mem_bytes

    @property
    def headroom(self) -> float:
        return self.inputs.gpu_mem_bytes - self.peak

    def to_dict(self) -> Dict[str, Any]:
        i = self.inputs
        layout = {k: v for k, v in dataclasses.asdict(i).items() if k != "shape"}
        return {"layout": layout, "model": {"family": i.shape.family, "total_params": self.total_params,
                                            "num_layers": i.shape.dims.num_layers,
                                            "padded_vocab_size": i.shape.padded_vocab_size},
                "stages": [s.to_dict() for s in self.stages], "peak_bytes": self.peak,
                "gpu_mem_bytes": i.gpu_mem_bytes, "fits": self.fits, "headroom_bytes": self.headroom,
                "checkpoint_bytes": self.checkpoint_bytes, "model_checkpoint_bytes": self.model_checkpoint_bytes,
                "notes": list(self.notes)}


def plan_memory(inp: PlanInputs) -> Plan:
    """The per-stage memory of ``inp`` (see the module docstring)."""
    _recompute_check(inp)
    shape, e, tp, pp = inp.shape, inp.e, inp.tp, inp.pp
    d = shape.dims
    from megatron_rcpa.models.decoder import check_parallel_layout

    check_parallel_layout(d, tp=tp, pp=1, padded_vocab_size=shape.padded_vocab_size)
    counts = stage_layer_counts(d.num_layers, pp, inp.num_layers_in_first_pipeline_stage,
                                inp.num_layers_in_last_pipeline_stage)
    b, s = inp.micro_batch_size, inp.train_seq_len
    opt_per_param = (12 if inp.dtype == "bf16" else 8) / (inp.dp if inp.distributed_optimizer else 1)
    v = shape.vision
    patches_per_image = inp.image_tokens * (v.spatial_merge_size ** 2 if v is not None else 1)
    if v is not None and v.kind == "llava":
        patches_per_image = v.seq_length  # the ViT runs patches + class token whatever the prompt holds
    rows = inp.rollout_rows
    prompt_cache = inp.prompt_len + inp.max_new_tokens
    stages = []
    for i, layers in enumerate(counts):
        first, last = i == 0, i == pp - 1
        params, frozen = stage_params(shape, tp, pp, i, layers)
        if first and v is not None and inp.freeze_vision:
            params -= v.params_per_rank(tp)
            frozen += v.params_per_rank(tp)
        weights = (params + frozen) * e
        in_flight = min(pp - i, inp.num_micro_batches)
        saved, transient = _stage_activations(inp, layers, b, s, first=first, last=last)
        vision = 0.0
        if first and not inp.freeze_vision:
            n_img = b * inp.images_per_row
            vision = vision_activation_bytes(shape, n_img * patches_per_image, tp, e, images=n_img,
                                             recompute=inp.vision_recompute)
            if inp.vision_recompute:  # one block recomputed at a time in backward
                transient += vision_forward_bytes(shape, n_img * patches_per_image, tp, e, images=n_img)
        elif first and v is not None:  # a frozen tower runs without saving anything: its forward temporaries
            n_img = b * inp.images_per_row
            transient += vision_forward_bytes(shape, n_img * patches_per_image, tp, e, images=n_img)
        loss = _loss_bytes(inp, b, s) if last else 0.0
        activations = in_flight * (saved + vision) + transient + loss
        kv = rows * prompt_cache * layers * 2 * max(d.num_kv_heads / tp, 1) * d.head_dim * e
        logits = rows * inp.prompt_len * shape.padded_vocab_size * e * (2 + 1 / tp) if last else 0.0
        prefill = decoder_layer_forward_bytes(shape, rows, inp.prompt_len, tp, e) if layers else 0.0
        if first:
            prefill += vision_forward_bytes(shape, rows * inp.images_per_row * patches_per_image, tp, e,
                                            images=rows * inp.images_per_row)
        stages.append(StageMemory(
            stage=i, layers=layers, params=params, frozen=frozen, weights=weights, grads=params * 4.0,
            optimizer=params * opt_per_param, reference=weights if inp.reference else 0.0, in_flight=in_flight,
            activations=activations, vision_activations=in_flight * vision, loss=loss, kv_cache=kv,
            prefill_logits=logits, prefill_transient=prefill))
    total = sum(stage_params(shape, 1, pp, i, c)[0] for i, c in enumerate(counts))
    if v is not None:  # counted once, not per stage-TP
        total = total - v.params_per_rank(1) + v.total_params
    if shape.tied and pp > 1:
        total -= shape.padded_vocab_size * d.hidden_size  # the last stage's copy is not a separate parameter
    frozen_total = v.frozen_numel if v is not None else 0
    model_ckpt = (total + frozen_total) * e
    trainable = total - (v.total_params if v is not None and inp.freeze_vision else 0)
    ckpt = model_ckpt + trainable * (12 if inp.dtype == "bf16" else 8)
    notes = []
    if inp.recompute_granularity == "full":
        notes.append(f"full recompute ({inp.recompute_method}, {inp.recompute_num_layers} layer(s)/chunk): one "
                     "chunk's activations are recomputed at a time in backward (counted once per stage)")
    return Plan(inputs=inp, stages=stages, checkpoint_bytes=ckpt, model_checkpoint_bytes=model_ckpt,
                total_params=total, notes=notes)
