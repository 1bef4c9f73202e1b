"""Fused core attention for the local (non-TE) layer spec: ``torch.nn.functional.scaled_dot_product_attention``.

:class:`SDPACoreAttention` is a drop-in for megatron-core's ``DotProductAttention`` (0.16 and 0.19 share it):
same constructor, same ``forward(query, key, value, attention_mask, attn_mask_type=, attention_bias=,
packed_seq_params=)``, same layouts (``[sq, b, np, hn]`` queries, ``[sk, b, ng, hn]`` keys/values, output
``[sq, b, np * hn]``), no parameters (state-dict keys of a model do not change when it is swapped in). On a GPU
SDPA picks the flash kernel (no explicit mask: causal or no mask) or the memory-efficient kernel (a mask); on a
CPU the fused CPU flash kernel or the math path. No scores/probabilities ``[b, np, sq, sk]`` are materialised
(the grouped GQA view repeats only the boolean mask, ``np // ng`` times).

Semantics, as ``DotProductAttention``'s:

* ``attention_mask``: boolean, True = masked out, broadcastable to ``[b, np, sq, sk]``. When given it is the
  whole mask (the mask type is not added to it), as in megatron.
* No mask: a causal mask type (``causal``, ``padding_causal``, ``causal_bottom_right``; of the module or of the
  call) masks causally, **bottom-right aligned** when there are fewer queries than keys (query ``i`` sees keys
  ``<= sk - sq + i``): exact for a KV-cache continuation. With one query there is nothing to mask (megatron does
  the same: it skips the mask when ``sq == 1``; its decode steps pass ``no_mask``). Megatron asserts
  ``sq == sk`` otherwise; ``padding`` / ``no_mask`` / ``arbitrary`` without a mask attend to every key.
* Scale: ``softmax_scale`` (the module's argument, which megatron's attention fills from
  ``config.softmax_scale``) or ``1/sqrt(hn)``. ``apply_query_key_layer_scaling`` divides the scores by the
  layer number before the softmax and multiplies them back inside it, in fp32: the product is the same scale,
  the trick only keeps fp16 ``QK^T`` from overflowing. SDPA's kernels accumulate ``QK^T`` in fp32, so the
  flag has nothing to protect here and the effective scale is used directly.
* Dropout (``attention_dropout`` or the config's) in training only, through SDPA's ``dropout_p``, inside
  megatron's model-parallel RNG tracker as ``DotProductAttention`` does (without sequence parallelism).
* GQA: ``enable_gqa=True`` (torch >= 2.5; keys/values are not repeated), else a grouped view that folds the
  ``np // ng`` query heads of a group into the query length (the mask is repeated, the keys are not). With a
  mask on CUDA, where torch says its memory-efficient kernel does not take ``enable_gqa`` (it would then run
  the unfused math path), the grouped view is used too.

Numerics. Megatron's unfused path computes the scores in the input dtype, upcasts them to fp32 for the softmax
(``attention_softmax_in_fp32``) and casts the probabilities back before ``P @ V``. SDPA's flash / efficient /
CPU-flash kernels keep the scores, the running max/sum and the ``P @ V`` accumulator in fp32 and round once, at
the output: in bf16 the two differ by bf16 rounding (about 1e-2 relative on outputs of order one; see
tests/models/test_sdpa_attention.py), in fp32 by reassociation only (~1e-6).

Fully masked rows (a left-padding query that sees no key) differ: megatron fills masked scores with -10000
and returns the uniform average of every value; SDPA would return zeros or NaN (by kernel), and a NaN would
then poison every later layer through ``0 * NaN``. Here such a row attends to every key instead. These rows
are padding, whose outputs are never read; every row with at least one visible key is exact.

Not supported (each refused with a message): packed sequences (``packed_seq_params``; the THD path needs TE),
``attention_bias``, sliding-window attention (``config.window_size``), ``softmax_type`` other than
``vanilla``, context parallelism.

Spec helpers: :func:`decoder_layer_spec` (megatron's local GPT layer with the chosen core attention),
:func:`vit_layer_spec` (the LLaVA ViT layer), :func:`with_core_attention` (any spec),
:func:`policy_attention_kwargs` (the builder keywords for a policy family).

The Qwen2.5-VL vision tower is transformers code: its attention is HF's ``attn_implementation``, which our
builder sets from ``vision_attn_implementation`` (default ``"sdpa"``, i.e. already SDPA; ``"eager"`` for the
unfused reference). It is not affected by these specs.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

__all__ = [
    "ATTENTION_BACKENDS",
    "SDPACoreAttention",
    "core_attention_module",
    "decoder_layer_spec",
    "policy_attention_kwargs",
    "sdpa_attention",
    "vit_layer_spec",
    "with_core_attention",
]

#: ``model.attention`` values: "sdpa" (:class:`SDPACoreAttention`) or "megatron" (``DotProductAttention``).
ATTENTION_BACKENDS = ("sdpa", "megatron")

_TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
#: ``scaled_dot_product_attention(enable_gqa=...)`` exists from torch 2.5.
NATIVE_GQA = _TORCH_VERSION >= (2, 5)
_GQA_MODES = ("auto", "native", "grouped")


def _bottom_right_causal(sq: int, sk: int, device: torch.device) -> torch.Tensor:
    """[sq, sk] bool, True = may attend: query i sees keys j <= sk - sq + i."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)


def _grouped_for_masked_gqa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attend: torch.Tensor,
                            dropout_p: float) -> bool:
    """With a mask only the memory-efficient kernel (not flash) is fused; some torch builds do not accept GQA
    (``enable_gqa``) there and would run the unfused math path. On CUDA, ask torch whether the efficient
    kernel takes these GQA inputs; if not, use the grouped view (plain MHA shapes, which it takes)."""
    if not query.is_cuda:
        return False
    from torch.backends.cuda import SDPAParams, can_use_efficient_attention

    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
    return not can_use_efficient_attention(SDPAParams(q, k, v, attend, dropout_p, False, True), False)


def sdpa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None, *, causal: bool, scale: float,
                   dropout_p: float = 0.0, gqa: str = "auto") -> torch.Tensor:
    """Attention in megatron's layouts through ``scaled_dot_product_attention``.

    Args:
        query: [sq, b, np, hn]; key: [sk, b, ng, hn]; value: [sk, b, ng, hv], ``ng`` divides ``np``
            (query head ``h`` uses key/value head ``h // (np // ng)``, as megatron's ``repeat_interleave``).
        attention_mask: optional bool, True = masked out, broadcastable to [b, np, sq, sk]; when given it is
            the whole mask.
        causal: without a mask, mask causally (bottom-right aligned when sq < sk; nothing to mask when sq == 1).
        scale: the softmax scale applied to ``q . k``.
        dropout_p: attention-probability dropout (pass 0 outside training).
        gqa: "auto" (``enable_gqa`` on torch >= 2.5, else the grouped view; with a mask on CUDA the grouped
            view where the efficient kernel does not take ``enable_gqa``), "native" or "grouped".

    Returns:
        [sq, b, np * hv] in the input dtype.
    """
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"query/key/value must be [s, b, heads, head_dim]; got shapes {list(query.shape)}, "
                         f"{list(key.shape)}, {list(value.shape)}")
    sq, b, np_, hn = query.shape
    sk, bk, ng, hk = key.shape
    if (bk, hk) != (b, hn) or value.shape[:3] != key.shape[:3]:
        raise ValueError(f"key {list(key.shape)} / value {list(value.shape)} do not match query {list(query.shape)} "
                         "(expected key [sk, b, ng, hn] and value [sk, b, ng, hv])")
    if np_ % ng:
        raise ValueError(f"{ng} key/value heads do not divide {np_} query heads")
    if gqa not in _GQA_MODES:
        raise ValueError(f"gqa={gqa!r}; expected one of {_GQA_MODES}")
    if gqa == "native" and not NATIVE_GQA:
        raise ValueError(f"gqa='native' needs torch >= 2.5 (scaled_dot_product_attention(enable_gqa=)); "
                         f"this is torch {torch.__version__}")
    rep = np_ // ng
    grouped = rep > 1 and (gqa == "grouped" or (gqa == "auto" and not NATIVE_GQA))

    attend: Optional[torch.Tensor] = None  # SDPA convention: True = may attend
    is_causal = False
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            raise ValueError(f"attention_mask must be a bool tensor (True = masked out), got {attention_mask.dtype}")
        if attention_mask.dim() != 4:
            raise ValueError(f"attention_mask must be 4-D, broadcastable to [b, np, sq, sk] = {[b, np_, sq, sk]}; "
                             f"got shape {list(attention_mask.shape)}")
        try:
            torch.broadcast_shapes(attention_mask.shape, (b, np_, sq, sk))
        except RuntimeError:
            raise ValueError(f"attention_mask of shape {list(attention_mask.shape)} does not broadcast to "
                             f"[b, np, sq, sk] = {[b, np_, sq, sk]}") from None
        # A row that sees no key attends to all of them (see the module docstring): no NaN, no branch.
        attend = ~attention_mask | attention_mask.all(dim=-1, keepdim=True)
        if rep > 1 and gqa == "auto" and not grouped:
            grouped = _grouped_for_masked_gqa(query, key, value, attend, dropout_p)
    elif causal and sq > 1:
        if sq > sk:
            raise ValueError(f"causal attention with more queries ({sq}) than keys ({sk}) and no attention_mask")
        if sq == sk and not grouped:
            is_causal = True
        else:
            attend = _bottom_right_causal(sq, sk, query.device).view(1, 1, sq, sk)

    if not grouped:
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)
        kwargs = {"enable_gqa": True} if rep > 1 else {}
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout_p, is_causal=is_causal,
                                             scale=scale, **kwargs)  # [b, np, sq, hv]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    # Grouped view: the rep query heads of a group become rep * sq query rows against the group's keys.
    q = query.view(sq, b, ng, rep, hn).permute(1, 2, 3, 0, 4).reshape(b, ng, rep * sq, hn)
    k = key.permute(1, 2, 0, 3)
    v = value.permute(1, 2, 0, 3)
    if attend is not None:
        mb, mh = attend.shape[0], attend.shape[1]
        attend = attend.expand(mb, mh, sq, sk)
        if mh == 1:
            attend = attend.unsqueeze(2).expand(mb, 1, rep, sq, sk).reshape(mb, 1, rep * sq, sk)
        else:  # mh == np
            attend = attend.reshape(mb, ng, rep * sq, sk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout_p, scale=scale)
    hv = out.shape[-1]
    return out.view(b, ng, rep, sq, hv).permute(3, 0, 1, 2, 4).reshape(sq, b, np_ * hv)


def _causal_type(mask_type: Any) -> bool:
    from megatron.core.transformer.enums import AttnMaskType

    return mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal,
                         getattr(AttnMaskType, "causal_bottom_right", AttnMaskType.causal))


class SDPACoreAttention(MegatronModule):
    """Megatron core attention on ``torch.nn.functional.scaled_dot_product_attention``: a drop-in for
    ``megatron.core.transformer.dot_product_attention.DotProductAttention`` (see the module docstring)."""

    #: "auto" | "native" | "grouped": how GQA reaches SDPA (tests force "grouped" on a new torch).
    gqa_mode = "auto"

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None) -> None:
        super().__init__(config=config)
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.utils import divide

        self.config = config
        where = "SDPACoreAttention (megatron_rcpa/models/attention.py)"
        if getattr(config, "context_parallel_size", 1) != 1:
            raise ValueError(f"{where}: context_parallel_size={config.context_parallel_size}; context parallelism "
                             "needs TEDotProductAttention (expected 1)")
        softmax_type = getattr(config, "softmax_type", "vanilla")
        if softmax_type != "vanilla":
            raise ValueError(f"{where}: config.softmax_type={softmax_type!r} is not supported (SDPA has no "
                             "softmax offset); use model.attention=megatron or softmax_type='vanilla'")
        if getattr(config, "window_size", None) is not None:
            raise ValueError(f"{where}: config.window_size={config.window_size} (sliding-window attention) is not "
                             "supported; use model.attention=megatron")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        elif not hasattr(pg_collection, "tp"):
            raise ValueError(f"{where}: pg_collection must have a 'tp' process group")
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        world_size = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, world_size)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, world_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, world_size)
        # apply_query_key_layer_scaling: megatron divides by the layer number and multiplies back in the
        # fp32 softmax; the net scale is this one (see the module docstring).
        self.softmax_scale = (1.0 / math.sqrt(self.hidden_size_per_attention_head) if softmax_scale is None
                              else float(softmax_scale))
        self.dropout_p = float(config.attention_dropout if attention_dropout is None else attention_dropout)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type=None, attention_bias=None,
                packed_seq_params=None) -> torch.Tensor:
        """[sq, b, np, hn] queries, [sk, b, ng, hn] keys/values -> [sq, b, np * hn] (see the module docstring)."""
        if packed_seq_params is not None:
            raise NotImplementedError("SDPACoreAttention (megatron_rcpa/models/attention.py): packed sequences "
                                      "(packed_seq_params) need TEDotProductAttention; got packed_seq_params="
                                      f"{type(packed_seq_params).__name__}")
        if attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention (megatron_rcpa/models/attention.py): attention_bias is not "
                                      "supported (DotProductAttention does not support it either)")
        causal = _causal_type(self.attn_mask_type) or (attn_mask_type is not None and _causal_type(attn_mask_type))
        dropout_p = self.dropout_p if self.training else 0.0
        run = lambda: sdpa_attention(query, key, value, attention_mask, causal=causal,  # noqa: E731
                                     scale=self.softmax_scale, dropout_p=dropout_p, gqa=self.gqa_mode)
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():
                return run()
        return run()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """No parameters (``DotProductAttention`` with the vanilla softmax has none either)."""
        return {}


# ------------------------------------------------------------------------------------------------ specs
def core_attention_module(attention: str):
    """The core-attention class for ``model.attention``: "sdpa" or "megatron" (``DotProductAttention``)."""
    if attention == "sdpa":
        return SDPACoreAttention
    if attention == "megatron":
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        return DotProductAttention
    raise ValueError(f"model.attention={attention!r}; expected one of {list(ATTENTION_BACKENDS)}")


def with_core_attention(layer_spec, attention: str):
    """A copy of a megatron layer ``ModuleSpec`` whose self-attention uses ``attention``'s core attention
    (module names, hence parameter names, unchanged)."""
    module = core_attention_module(attention)
    spec = copy.deepcopy(layer_spec)
    self_attention = getattr(getattr(spec, "submodules", None), "self_attention", None)
    sub = getattr(self_attention, "submodules", None)
    if sub is None or not hasattr(sub, "core_attention"):
        raise ValueError(f"layer spec {layer_spec!r} has no submodules.self_attention.submodules.core_attention")
    sub.core_attention = module
    return spec


def decoder_layer_spec(attention: str = "sdpa", normalization: str = "RMSNorm"):
    """megatron's local (non-TE) GPT layer spec (``get_gpt_layer_local_spec(normalization=...)``: the decoder of
    every policy family) with ``attention``'s core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return with_core_attention(get_gpt_layer_local_spec(normalization=normalization), attention)


def vit_layer_spec(attention: str = "sdpa"):
    """The LLaVA ViT layer (:func:`megatron_rcpa.models.llava.vit_layer_local_spec`, non-causal) with
    ``attention``'s core attention."""
    from megatron_rcpa.models.llava import vit_layer_local_spec

    return with_core_attention(vit_layer_local_spec(), attention)


def policy_attention_kwargs(family: str, attention: str = "sdpa") -> Dict[str, Any]:
    """Builder keywords that give a policy family ``attention``'s core attention: ``transformer_layer_spec``
    for every family, plus ``vision_layer_spec`` for a family whose vision tower is megatron's ViT (LLaVA).
    The Qwen2.5-VL vision tower is HF code: its attention follows ``vision_attn_implementation`` (default
    "sdpa"), not these keywords."""
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention={attention!r}; expected one of {list(ATTENTION_BACKENDS)}")
    from megatron_rcpa.models import families

    # a string: the policies' own local block spec (LocalNorm, sized per stage) with this core attention
    kwargs: Dict[str, Any] = {"transformer_layer_spec": attention}
    if families.get(family).megatron_vision:
        kwargs["vision_layer_spec"] = vit_layer_spec(attention)
    return kwargs
