"""Qwen2.5-VL as a Megatron-Core policy at any TP/PP.

Layout (the names here and in :mod:`megatron_rcpa.convert.weight_maps` are the only place parameter names
are spelled out):

* ``language_model``: megatron ``GPTModel`` (local layer spec) with MRoPE, the Qwen2 decoder: RMSNorm,
  SwiGLU, QKV bias, GQA, tied or untied embeddings; the vocabulary padded to ``padded_vocab_size`` (zero rows).
* ``vision_model``: the transformers ``Qwen2_5_VisionTransformerPretrainedModel`` (ViT + patch merger),
  only on the first pipeline stage, replicated on every TP rank. Its parameters carry
  ``average_gradients_across_tp_domain = True`` so megatron's ``finalize_model_grads`` averages their
  gradients over the TP group; without megatron DDP call :func:`allreduce_vision_grads` after backward.
  In the distributed checkpoint they are replicated tensors (saved once, loadable at any TP/PP).

Forward (the shared :meth:`~megatron_rcpa.models.policy_base.DecoderPolicy.forward`): token ids (+ flattened
image patches and ``image_grid_thw``) -> on the first stage, text embeddings with the merged image features
scattered in at image-token positions; 3-D position ids computed as transformers does
(:mod:`megatron_rcpa.models.mrope`) on every stage;
-> on the last stage vocab-parallel logits ``[B, S, padded_vocab / TP]`` whose padding columns hold
:data:`PADDED_VOCAB_LOGIT` (so a softmax over them is the softmax over the real vocabulary), or a
per-token cross entropy (``labels``), or whatever ``loss_fn(logits)`` returns. Intermediate stages return
the hidden states ``[S, B, H]`` for the pipeline schedule. With a :class:`~megatron_rcpa.models.inference.KVCache`
the same forward does prefill and incremental decoding.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from megatron.core import parallel_state
from megatron.core.utils import make_sharded_tensor_for_checkpoint

from megatron_rcpa.models.mrope import mrope_position_ids, next_positions, text_position_ids
from megatron_rcpa.models.policy_base import PADDED_VOCAB_LOGIT, DecoderPolicy, build_decoder_policy
from megatron_rcpa.models.qwen2_5_vl_config import qwen2_5_vl_decoder_dims, qwen2_5_vl_hf_config

__all__ = [
    "PADDED_VOCAB_LOGIT",
    "Qwen2_5_VLPolicy",
    "allreduce_vision_grads",
    "build_qwen2_5_vl_policy",
]


def _build_vision_tower(vision_config: Any, dtype: torch.dtype, attn_implementation: str) -> torch.nn.Module:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    vision_config = copy.deepcopy(vision_config)
    vision_config._attn_implementation = attn_implementation
    return Qwen2_5_VisionTransformerPretrainedModel._from_config(vision_config, dtype=dtype)


class Qwen2_5_VLPolicy(DecoderPolicy):
    """Qwen2.5-VL policy (one pipeline stage of it). Build it with :func:`build_qwen2_5_vl_policy`."""

    def __init__(self, hf_config: Any, config, *, padded_vocab_size: int, pre_process: bool = True,
                 post_process: bool = True, vision_attn_implementation: str = "sdpa",
                 transformer_layer_spec=None) -> None:
        super().__init__(config=config)
        hf_config = qwen2_5_vl_hf_config(hf_config)
        self._build_language_model(hf_config, qwen2_5_vl_decoder_dims(hf_config), config,
                                   padded_vocab_size=padded_vocab_size, pre_process=pre_process,
                                   post_process=post_process, transformer_layer_spec=transformer_layer_spec,
                                   position_embedding_type="mrope")
        self.image_token_id = int(hf_config.image_token_id)
        self.video_token_id = int(hf_config.video_token_id)
        self.spatial_merge_size = int(hf_config.vision_config.spatial_merge_size)
        self.vision_model = None
        if pre_process:
            self.vision_model = _build_vision_tower(hf_config.vision_config, config.params_dtype,
                                                    vision_attn_implementation)
            for param in self.vision_model.parameters():
                param.average_gradients_across_tp_domain = True

    # ------------------------------------------------------------------------------------ megatron glue
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """The language model's sharded state dict plus the vision tower as replicated tensors."""
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.vision_model is not None:
            for name, tensor in self.vision_model.state_dict(keep_vars=True).items():
                key = f"{prefix}vision_model.{name}"
                sharded[key] = make_sharded_tensor_for_checkpoint(tensor, key, prepend_offsets=sharded_offsets)
        return sharded

    # ---------------------------------------------------------------------------------------- helpers
    def position_ids(self, input_ids: torch.Tensor, image_grid_thw: Optional[torch.Tensor] = None,
                     attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[3, B, S] MRoPE position ids, as transformers computes them."""
        pos, _ = mrope_position_ids(input_ids, image_grid_thw, image_token_id=self.image_token_id,
                                    spatial_merge_size=self.spatial_merge_size, attention_mask=attention_mask,
                                    video_token_id=self.video_token_id)
        return pos

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
              image_grid_thw: Optional[torch.Tensor] = None, *, strict: bool = True) -> torch.Tensor:
        """[S, B, H] decoder input: token embeddings with image features at image-token positions.

        ``strict``: image tokens without ``pixel_values`` are an error (off for decode steps, where a sampled
        image-pad token is embedded like any other token, as transformers does).
        """

        def features(num_image_tokens: int) -> torch.Tensor:
            if image_grid_thw is None:
                raise ValueError("pixel_values given without image_grid_thw")
            vision_dtype = next(self.vision_model.parameters()).dtype
            out = self.vision_model(pixel_values.to(vision_dtype), grid_thw=image_grid_thw).pooler_output
            if out.shape[0] != num_image_tokens:
                raise ValueError(f"input_ids hold {num_image_tokens} image tokens (id {self.image_token_id}) but "
                                 f"the vision tower produced {out.shape[0]} image features from image_grid_thw "
                                 f"{image_grid_thw.tolist()}")
            return out

        return self._embed_with_images(input_ids, self.image_token_id, pixel_values, features, strict=strict)

    # ------------------------------------------------------------------------------ forward hooks
    def check_image_inputs(self, pixel_values, image_grid_thw) -> None:
        """Flattened patches [sum(t*h*w), C*T*P*P] of all images with their [N, 3] patch grids."""

    def embed_input(self, input_ids, pixel_values, image_grid_thw, *, strict: bool) -> torch.Tensor:
        return self.embed(input_ids, pixel_values, image_grid_thw, strict=strict)

    def rotary_positions(self, input_ids, position_ids, attention_mask, image_grid_thw, kv_cache) -> torch.Tensor:
        """[3, B, S] MRoPE ids: the given ones ([B, S] is used for all three streams, as transformers does), or
        computed from the tokens and grids. With a KV cache the decode steps continue from the prompt's largest
        position + 1 (transformers' ``rope_deltas``); the cache keeps every position so far (its padding mask
        has been extended with the new tokens already)."""
        if position_ids is not None and position_ids.dim() == 2:  # text positions: the same in all 3 streams
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        if kv_cache is None:
            return position_ids if position_ids is not None else self.position_ids(input_ids, image_grid_thw,
                                                                                   attention_mask)
        batch, seq = input_ids.shape
        if kv_cache.seq_len == 0:
            if position_ids is None:
                position_ids = self.position_ids(input_ids, image_grid_thw, attention_mask)
            kv_cache.position_ids = position_ids
        else:
            if position_ids is None:
                position_ids = text_position_ids(batch, seq, start=kv_cache.next_position, device=input_ids.device)
            kv_cache.position_ids = torch.cat([kv_cache.position_ids, position_ids], dim=2)
        kv_cache.next_position = next_positions(kv_cache.position_ids, kv_cache.attention_mask)
        return kv_cache.position_ids


def allreduce_vision_grads(model: torch.nn.Module) -> None:
    """Average the vision tower's gradients over the tensor-parallel group (call after backward).

    The vision tower runs replicated on every TP rank; its gradients agree up to rounding, and averaging
    keeps the replicas bit-identical. Acts on ``param.main_grad`` (megatron DDP) or ``param.grad``.
    Megatron's ``finalize_model_grads`` does the same for these parameters (they carry
    ``average_gradients_across_tp_domain``), so calling both is harmless. A no-op at TP=1 and on stages
    without the vision tower. Collective over the TP group.
    """
    module = model
    while not hasattr(module, "vision_model") and hasattr(module, "module"):
        module = module.module
    tp = parallel_state.get_tensor_model_parallel_world_size()
    vision = getattr(module, "vision_model", None)
    if tp == 1 or vision is None:
        return
    group = parallel_state.get_tensor_model_parallel_group()
    grads = []
    for param in vision.parameters():
        grad = getattr(param, "main_grad", None)
        if grad is None:
            grad = param.grad
        if grad is not None:
            grads.append(grad)
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors([g.data for g in grads])
    torch.distributed.all_reduce(flat, group=group)
    flat.div_(tp)
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.data.copy_(synced)


def build_qwen2_5_vl_policy(hf_config: Any, *, vision_attn_implementation: str = "sdpa", **kwargs: Any
                            ) -> Qwen2_5_VLPolicy:
    """Build this rank's stage of a Qwen2.5-VL policy at the current megatron TP/PP layout (keywords of
    :func:`~megatron_rcpa.models.policy_base.build_decoder_policy`; ``vision_attn_implementation`` is the
    HF vision tower's attention). The vision tower is built in ``params_dtype``."""
    hf_config = qwen2_5_vl_hf_config(hf_config)

    def make(config, *, tp, dtype, perform_initialization, **stage: Any) -> Qwen2_5_VLPolicy:
        return Qwen2_5_VLPolicy(hf_config, config, vision_attn_implementation=vision_attn_implementation, **stage)

    return build_decoder_policy(make, qwen2_5_vl_decoder_dims(hf_config), what="Qwen2.5-VL", **kwargs)
