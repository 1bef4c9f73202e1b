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

Forward (see :meth:`Qwen2_5_VLPolicy.forward`): token ids (+ flattened image patches and ``image_grid_thw``)
-> on the first stage, text embeddings with the merged image features scattered in at image-token positions;
3-D position ids computed as transformers does (:mod:`megatron_rcpa.models.mrope`) on every stage;
-> on the last stage vocab-parallel logits ``[B, S, padded_vocab / TP]`` whose padding columns hold
:data:`PADDED_VOCAB_LOGIT` (so a softmax over them is the softmax over the real vocabulary), or a
per-token cross entropy (``labels``), or whatever ``loss_fn(logits)`` returns. Intermediate stages return
the hidden states ``[S, B, H]`` for the pipeline schedule. With a :class:`~megatron_rcpa.models.inference.KVCache`
the same forward does prefill and incremental decoding.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.utils import make_sharded_tensor_for_checkpoint

from megatron_rcpa.models.decoder import (
    check_parallel_layout,
    decoder_transformer_config,
    pad_vocab_size,
    parse_dtype,
)
from megatron_rcpa.models.mrope import mrope_position_ids, next_positions, text_position_ids
from megatron_rcpa.models.policy_base import PADDED_VOCAB_LOGIT, DecoderPolicy
from megatron_rcpa.models.qwen2_5_vl_config import qwen2_5_vl_decoder_dims, qwen2_5_vl_hf_config

__all__ = [
    "PADDED_VOCAB_LOGIT",
    "Qwen2_5_VLPolicy",
    "allreduce_vision_grads",
    "build_qwen2_5_vl_policy",
    "trainer_forward",
]

#: Value of the logits of padded vocabulary entries: exp() of it is exactly 0 in fp32/bf16, and unlike -inf
#: it keeps ``p * log p`` (entropy) finite.


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
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        hf_config = qwen2_5_vl_hf_config(hf_config)
        dims = qwen2_5_vl_decoder_dims(hf_config)
        self.hf_config = hf_config
        self.dims = dims
        self.vocab_size = dims.vocab_size
        self.padded_vocab_size = int(padded_vocab_size)
        self.image_token_id = int(hf_config.image_token_id)
        self.video_token_id = int(hf_config.video_token_id)
        self.spatial_merge_size = int(hf_config.vision_config.spatial_merge_size)
        self.pre_process = pre_process
        self.post_process = post_process
        self.share_embeddings_and_output_weights = dims.tie_word_embeddings

        self.language_model = GPTModel(
            config=config,
            transformer_layer_spec=transformer_layer_spec or get_gpt_layer_local_spec(normalization="RMSNorm"),
            vocab_size=self.padded_vocab_size,
            max_sequence_length=dims.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=dims.tie_word_embeddings,
            position_embedding_type="mrope",
            rotary_base=dims.rope_theta,
        )
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

    # ---------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.Tensor] = None,
        *,
        labels: Optional[torch.Tensor] = None,
        loss_fn: Optional[Callable[[torch.Tensor], Any]] = None,
        kv_cache=None,
        runtime_gather_output: bool = False,
    ):
        """One pipeline stage of the policy.

        Args:
            input_ids: [B, S] token ids (every stage needs them: position ids are computed per stage).
            position_ids: optional [3, B, S] MRoPE ids (or [B, S], used for all three streams, as transformers
                does); computed from ``input_ids``/``image_grid_thw`` if None (what image batches need).
            attention_mask: optional [B, S] padding mask (1 = token, 0 = pad); None = all tokens.
            pixel_values: [sum(t*h*w), C*T*P*P] flattened patches of all images (first stage only).
            image_grid_thw: [N, 3] patch grid per image.
            labels: [B, S] target ids -> returns the per-token cross entropy [B, S] (fp32).
            loss_fn: called with the vocab-parallel logits [B, S, V/TP]; its result is returned.
            kv_cache: a :class:`~megatron_rcpa.models.inference.KVCache`: the first call fills it with the
                prompt (prefill), later calls take the new tokens only (``attention_mask`` then covers the
                new tokens only); positions continue from the prompt's largest position + 1 (transformers'
                ``rope_deltas``). Logits come gathered over TP.
            runtime_gather_output: gather the logits over TP (full padded vocabulary on every rank; always
                so with ``kv_cache``).

        Returns:
            On the last stage: logits [B, S, V/TP] (padding columns = ``PADDED_VOCAB_LOGIT``), or the loss;
            on other stages: hidden states [S, B, H] for the next stage.
        """
        seq = input_ids.shape[1]
        key_mask = attention_mask
        if position_ids is not None and position_ids.dim() == 2:  # text positions: the same in all 3 streams
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        prefill = kv_cache is None or kv_cache.seq_len == 0
        if kv_cache is not None:
            runtime_gather_output = True  # megatron's inference path wants gathered logits
            position_ids, key_mask = self._extend_cache(kv_cache, input_ids, position_ids, attention_mask,
                                                        image_grid_thw)
        elif position_ids is None:
            position_ids = self.position_ids(input_ids, image_grid_thw, attention_mask)

        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(input_ids, pixel_values, image_grid_thw, strict=prefill)
            if self.config.sequence_parallel:
                # GPTModel does not scatter a decoder_input it is given (untested here: SP needs TE norms).
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        mask = _attention_mask(key_mask, seq)
        output = self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=mask,
            decoder_input=decoder_input,
            inference_context=kv_cache.context if kv_cache is not None else None,
            runtime_gather_output=runtime_gather_output,
        )
        if kv_cache is not None:
            kv_cache.context.sequence_len_offset += seq
        return self._finish(output, gathered=runtime_gather_output, labels=labels, loss_fn=loss_fn)

    def _extend_cache(self, kv_cache, input_ids, position_ids, attention_mask, image_grid_thw):
        batch, seq = input_ids.shape
        if kv_cache.seq_len + seq > kv_cache.max_sequence_length:
            raise ValueError(f"{kv_cache.seq_len} cached + {seq} new tokens exceed the KV cache's "
                             f"max_sequence_length {kv_cache.max_sequence_length}")
        if batch > kv_cache.max_batch_size:
            raise ValueError(f"batch size {batch} exceeds the KV cache's max_batch_size {kv_cache.max_batch_size}")
        new_mask = (attention_mask.to(torch.bool) if attention_mask is not None
                    else torch.ones(batch, seq, dtype=torch.bool, device=input_ids.device))
        if kv_cache.seq_len == 0:
            if position_ids is None:
                position_ids = self.position_ids(input_ids, image_grid_thw, attention_mask)
            kv_cache.position_ids = position_ids
            kv_cache.attention_mask = new_mask
        else:
            if kv_cache.position_ids.shape[1] != batch:
                raise ValueError(f"decode batch size {batch} != prefill batch size {kv_cache.position_ids.shape[1]}")
            if position_ids is None:
                position_ids = text_position_ids(batch, seq, start=kv_cache.next_position, device=input_ids.device)
            kv_cache.position_ids = torch.cat([kv_cache.position_ids, position_ids], dim=2)
            kv_cache.attention_mask = torch.cat([kv_cache.attention_mask, new_mask], dim=1)
        kv_cache.next_position = next_positions(kv_cache.position_ids, kv_cache.attention_mask)
        return kv_cache.position_ids, kv_cache.attention_mask


def trainer_forward(model: torch.nn.Module, mb: Dict[str, torch.Tensor]):
    """``forward_fn`` for :mod:`megatron_rcpa.train.step`: ``mb["tokens"]`` [b, s] plus, when the rows hold
    images, ``mb["pixel_values"]`` / ``mb["image_grid_thw"]`` of exactly those rows (see
    :func:`megatron_rcpa.models.mrope.select_image_rows`) and an optional ``mb["attention_mask"]``.
    Position ids are computed from the tokens and grids. Returns vocab-parallel logits [b, s, V/TP]."""
    return model(input_ids=mb["tokens"], attention_mask=mb.get("attention_mask"),
                 pixel_values=mb.get("pixel_values"), image_grid_thw=mb.get("image_grid_thw"))


def _attention_mask(key_mask: Optional[torch.Tensor], q_len: int) -> Optional[torch.Tensor]:
    """megatron boolean mask [B, 1, q, k] (True = masked) for the last ``q_len`` queries over ``k`` keys.

    None where the default causal mask (``q == k``) or no mask (``q == 1``) is exact.
    """
    if key_mask is None:
        return None
    key_mask = key_mask.to(torch.bool)
    k_len = key_mask.shape[1]
    if bool(key_mask.all()) and (q_len == k_len or q_len == 1):
        return None
    q_pos = torch.arange(k_len - q_len, k_len, device=key_mask.device).view(q_len, 1)
    k_pos = torch.arange(k_len, device=key_mask.device).view(1, k_len)
    future = (k_pos > q_pos).view(1, 1, q_len, k_len)
    return future | ~key_mask.view(key_mask.shape[0], 1, 1, k_len)


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


def build_qwen2_5_vl_policy(
    hf_config: Any,
    *,
    params_dtype: Any = torch.float32,
    padded_vocab_size: Optional[int] = None,
    make_vocab_size_divisible_by: int = 128,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    perform_initialization: bool = True,
    vision_attn_implementation: str = "sdpa",
    transformer_layer_spec=None,
    config_overrides: Optional[Dict[str, Any]] = None,
) -> Qwen2_5_VLPolicy:
    """Build this rank's stage of a Qwen2.5-VL policy at the current megatron TP/PP layout.

    ``megatron.core.parallel_state`` must be initialised. ``padded_vocab_size`` (take it from the
    checkpoint metadata) defaults to the vocabulary rounded up to ``make_vocab_size_divisible_by``.
    With ``perform_initialization=False`` the weights are left uninitialised (load a checkpoint next).
    The model is moved to the current CUDA device when CUDA is available.
    """
    hf_config = qwen2_5_vl_hf_config(hf_config)
    dims = qwen2_5_vl_decoder_dims(hf_config)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if parallel_state.get_context_parallel_world_size() > 1:
        raise ValueError("context parallelism is not supported by the Qwen2.5-VL policy")
    if padded_vocab_size is None:
        padded_vocab_size = pad_vocab_size(dims.vocab_size, make_vocab_size_divisible_by)
    if padded_vocab_size < dims.vocab_size:
        raise ValueError(f"padded_vocab_size={padded_vocab_size} < vocab_size={dims.vocab_size}")
    check_parallel_layout(dims, tp=tp, pp=pp, padded_vocab_size=padded_vocab_size)
    config = decoder_transformer_config(dims, tp=tp, pp=pp, params_dtype=parse_dtype(params_dtype),
                                        perform_initialization=perform_initialization,
                                        **(config_overrides or {}))
    policy = Qwen2_5_VLPolicy(
        hf_config, config, padded_vocab_size=padded_vocab_size,
        pre_process=parallel_state.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=parallel_state.is_pipeline_last_stage() if post_process is None else post_process,
        vision_attn_implementation=vision_attn_implementation,
        transformer_layer_spec=transformer_layer_spec,
    )
    if config.params_dtype != torch.float32:
        # The local spec's torch norms are created in fp32 whatever params_dtype says; make the language model
        # uniform (as megatron's Float16Module would). The HF vision tower was built in params_dtype already.
        policy.language_model.to(dtype=config.params_dtype)
    if torch.cuda.is_available():
        policy.cuda(torch.cuda.current_device())
    return policy
