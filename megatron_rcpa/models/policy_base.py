"""What every policy shares: the megatron glue around ``self.language_model`` (a GPTModel), the one
``forward`` (KV cache, padding mask, image embedding, then padded-vocabulary masking and logits / per-token
cross entropy / a given loss), the one builder (:func:`build_decoder_policy`) and the one ``forward_fn`` the
training step runs (:func:`trainer_forward`).

A policy subclass builds ``self.language_model`` with :meth:`DecoderPolicy._build_language_model` and says
only what is its own through four hooks: :meth:`~DecoderPolicy.check_image_inputs` (which image arguments it
takes), :meth:`~DecoderPolicy.rotary_positions` (RoPE positions 0..S-1 by default; Qwen2.5-VL's MRoPE),
:meth:`~DecoderPolicy.embed_input` (None by default: the GPTModel embeds the tokens; the VLMs scatter image
features in) and :meth:`~DecoderPolicy.cast_to` (what ``params_dtype`` applies to after the build).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from megatron_rcpa.models.decoder import (
    DecoderDims,
    check_parallel_layout,
    decoder_transformer_config,
    pad_vocab_size,
    parse_dtype,
)
from megatron_rcpa.models.parallel_knobs import check_knobs, sequence_parallel_length, sequence_parallel_off

__all__ = ["PADDED_VOCAB_LOGIT", "DecoderPolicy", "build_decoder_policy", "causal_padding_mask", "trainer_forward"]

# Logit given to Megatron's padded vocabulary columns: a softmax over the padded vocabulary then equals the
# softmax over the real one (exp(-1e4) underflows to 0 in fp32 and bf16), and unlike -inf it keeps
# ``p * log p`` (entropy) finite.
PADDED_VOCAB_LOGIT = -1.0e4


def causal_padding_mask(key_mask: Optional[torch.Tensor], q_len: int) -> Optional[torch.Tensor]:
    """megatron boolean mask [B, 1, q, k] (True = masked) for the last ``q_len`` queries over the ``k`` keys
    of ``key_mask`` [B, k] (1 = token, 0 = padding), causal.

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


def _pad_sequence(input_ids: torch.Tensor, position_ids: Optional[torch.Tensor], key_mask: Optional[torch.Tensor],
                  pad: int):
    """Append ``pad`` tokens to a [B, S] batch: token 0, positions continuing the last one, mask 1."""
    if pad == 0:
        return input_ids, position_ids, key_mask
    input_ids = torch.nn.functional.pad(input_ids, (0, pad))
    if position_ids is not None:
        steps = torch.arange(1, pad + 1, device=position_ids.device, dtype=position_ids.dtype)
        position_ids = torch.cat([position_ids, position_ids[..., -1:] + steps], dim=-1)
    if key_mask is not None:
        key_mask = torch.nn.functional.pad(key_mask, (0, pad), value=1)
    return input_ids, position_ids, key_mask


def trainer_forward(model: torch.nn.Module, mb: Dict[str, torch.Tensor]):
    """``forward_fn`` for :mod:`megatron_rcpa.train.step`, for every family: ``mb["tokens"]`` [b, s], an
    optional ``mb["attention_mask"]`` and, when the rows hold images, the vision inputs of exactly those rows
    (``pixel_values``, and ``image_grid_thw`` for Qwen2.5-VL). Returns vocab-parallel logits [b, s, V/TP]."""
    images = {k: mb[k] for k in ("pixel_values", "image_grid_thw") if mb.get(k) is not None}
    return model(input_ids=mb["tokens"], attention_mask=mb.get("attention_mask"), **images)


class DecoderPolicy(MegatronModule):
    """One pipeline stage of a decoder policy; see the module docstring for what a family adds."""

    # ------------------------------------------------------------------------------------------ build
    def _build_language_model(self, hf_config: Any, dims: DecoderDims, config, *, padded_vocab_size: int,
                              pre_process: bool, post_process: bool, transformer_layer_spec=None,
                              position_embedding_type: str = "rope") -> None:
        """The Llama / Qwen2 decoder as ``self.language_model`` (a GPTModel with RoPE, or MRoPE), and the
        attributes the shared forward reads."""
        from megatron.core.models.gpt import GPTModel

        from megatron_rcpa.models.norms import local_block_spec

        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        self.hf_config = hf_config
        self.dims = dims
        self.vocab_size = dims.vocab_size
        self.padded_vocab_size = int(padded_vocab_size)
        self.pre_process = pre_process
        self.post_process = post_process
        self.share_embeddings_and_output_weights = dims.tie_word_embeddings
        rope = {"rotary_percent": 1.0} if position_embedding_type == "rope" else {}
        self.language_model = GPTModel(
            config=config,
            # the local layer spec with our norms (sequence parallel without TE; uneven stages); a string names
            # its core attention (megatron | sdpa), a spec replaces it (e.g. Transformer Engine's for FP8)
            transformer_layer_spec=(local_block_spec(config, "RMSNorm", attention=transformer_layer_spec or "megatron")
                                    if transformer_layer_spec is None or isinstance(transformer_layer_spec, str)
                                    else transformer_layer_spec),
            vocab_size=self.padded_vocab_size,
            max_sequence_length=dims.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=dims.tie_word_embeddings,
            # with sequence parallel the forward embeds and scatters itself (image features go in first)
            scatter_embedding_sequence_parallel=False,
            position_embedding_type=position_embedding_type,
            rotary_base=dims.rope_theta,
            **rope,
        )

    def cast_to(self, dtype: torch.dtype) -> None:
        """Make the stage uniform in ``params_dtype`` after the build: torch norms (megatron's local spec, e.g.
        in a caller's layer spec) are created in fp32 whatever ``params_dtype`` says (as megatron's
        Float16Module would)."""
        self.language_model.to(dtype=dtype)

    # ------------------------------------------------------------------------------------ megatron glue
    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand the previous stage's activations in here."""
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        return self.language_model.sharded_state_dict(prefix=f"{prefix}language_model.", metadata=metadata)

    # ------------------------------------------------------------------------------------ family hooks
    def check_image_inputs(self, pixel_values: Optional[torch.Tensor], image_grid_thw: Optional[torch.Tensor]) -> None:
        """ValueError for image arguments this family does not take (a text LM takes none)."""
        if pixel_values is not None or image_grid_thw is not None:
            raise ValueError("a text LM policy takes no pixel_values / image_grid_thw")

    def rotary_positions(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor],
                         attention_mask: Optional[torch.Tensor], image_grid_thw: Optional[torch.Tensor],
                         kv_cache) -> Optional[torch.Tensor]:
        """The ``position_ids`` handed to the GPTModel. RoPE: positions are 0..S-1 per row (continuing after
        the cached tokens), as a transformers forward without ``position_ids`` uses them; anything else given
        is a ValueError. Returns None (the GPTModel's own positions)."""
        if position_ids is not None:
            batch, seq = input_ids.shape
            start = kv_cache.seq_len if kv_cache is not None else 0
            expected = torch.arange(start, start + seq, device=input_ids.device).expand(batch, seq)
            if position_ids.shape != (batch, seq) or not torch.equal(position_ids.to(expected.device), expected):
                raise ValueError("position_ids must be None or 0..S-1 per row (continuing after the KV cache): "
                                 "RoPE positions follow the sequence")
        return None

    def embed_input(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
                    image_grid_thw: Optional[torch.Tensor], *, strict: bool) -> Optional[torch.Tensor]:
        """The decoder input [S, B, H] on the first stage, or None to let the GPTModel embed the tokens."""
        return None

    # ----------------------------------------------------------------------------------------- inputs
    def _embed_with_images(self, input_ids: torch.Tensor, image_token_id: int, pixel_values: Optional[torch.Tensor],
                           features: Callable[[int], torch.Tensor], *, strict: bool) -> torch.Tensor:
        """[S, B, H] decoder input: the token embeddings with ``features(n)`` ([n, H], for the n image tokens
        in order; it checks that its images fill them) scattered in at the ``image_token_id`` positions.
        ``strict``: image tokens without ``pixel_values`` are an error (off for decode steps, where a sampled
        image token is embedded like any other token, as transformers does)."""
        if not self.pre_process:
            raise RuntimeError("embed() runs on the first pipeline stage only")
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [S, B, H]
        image_mask = input_ids == image_token_id
        num_image_tokens = int(image_mask.sum())
        if pixel_values is None:
            if num_image_tokens and strict:
                raise ValueError(f"input_ids hold {num_image_tokens} image tokens (id {image_token_id}) but "
                                 "pixel_values is None")
            return emb
        image = features(num_image_tokens).reshape(-1, emb.shape[-1])
        emb = emb.transpose(0, 1).masked_scatter(image_mask.unsqueeze(-1), image.to(emb.dtype))
        return emb.transpose(0, 1).contiguous()

    @staticmethod
    def _extend_cache_mask(kv_cache, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Append the new tokens' padding mask to the cache's; returns the mask over every cached key."""
        batch, seq = input_ids.shape
        if kv_cache.seq_len + seq > kv_cache.max_sequence_length:
            raise ValueError(f"{kv_cache.seq_len} cached + {seq} new tokens exceed the KV cache's "
                             f"max_sequence_length {kv_cache.max_sequence_length}")
        if batch > kv_cache.max_batch_size:
            raise ValueError(f"batch size {batch} exceeds the KV cache's max_batch_size {kv_cache.max_batch_size}")
        new_mask = (attention_mask.to(torch.bool) if attention_mask is not None
                    else torch.ones(batch, seq, dtype=torch.bool, device=input_ids.device))
        if kv_cache.seq_len == 0:
            kv_cache.attention_mask = new_mask
        else:
            if kv_cache.attention_mask.shape[0] != batch:
                raise ValueError(f"decode batch size {batch} != prefill batch size {kv_cache.attention_mask.shape[0]}")
            kv_cache.attention_mask = torch.cat([kv_cache.attention_mask, new_mask], dim=1)
        return kv_cache.attention_mask

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
            input_ids: [B, S] token ids (every stage needs them: position ids are computed per stage), with
                the family's image tokens where images go.
            position_ids: optional; see :meth:`rotary_positions` (RoPE: must be 0..S-1; Qwen2.5-VL: [3, B, S]
                MRoPE ids or [B, S] used for all three streams, computed from the tokens and grids if None).
            attention_mask: optional [B, S] padding mask (1 = token, 0 = pad); None = all tokens. With
                ``kv_cache`` it covers the new tokens only.
            pixel_values / image_grid_thw: the family's vision inputs (first stage only; see
                :meth:`check_image_inputs` and the family's ``embed``).
            labels: [B, S] target ids -> returns the per-token cross entropy [B, S] (fp32).
            loss_fn: called with the vocab-parallel logits [B, S, V/TP]; its result is returned.
            kv_cache: a :class:`~megatron_rcpa.models.inference.KVCache`: the first call fills it with the
                prompt (prefill), later calls take the new tokens only; positions continue after the prompt.
                Logits come gathered over TP.
            runtime_gather_output: gather the logits over TP (full padded vocabulary on every rank; always
                so with ``kv_cache``).

        With ``config.sequence_parallel`` the first stage embeds (and scatters in the images) itself, pads the
        sequence at its end to a multiple of TP and scatters it over TP; the logits come back unpadded (a
        pipeline schedule must be given the padded length,
        :func:`~megatron_rcpa.models.parallel_knobs.sequence_parallel_length`). KV-cache passes run with
        sequence parallelism off.

        Returns:
            On the last stage: logits [B, S, V/TP] (padding columns = ``PADDED_VOCAB_LOGIT``), or the loss;
            on other stages: hidden states [S, B, H] for the next stage.
        """
        if kv_cache is not None and self.config.sequence_parallel:
            # a decode step holds one token: KV-cache passes run without sequence parallelism, as megatron's
            # own inference does (set_model_to_sequence_parallel)
            with sequence_parallel_off(self):
                return self.forward(input_ids, position_ids, attention_mask, pixel_values, image_grid_thw,
                                    labels=labels, loss_fn=loss_fn, kv_cache=kv_cache,
                                    runtime_gather_output=runtime_gather_output)
        self.check_image_inputs(pixel_values, image_grid_thw)
        seq = input_ids.shape[1]
        prefill = kv_cache is None or kv_cache.seq_len == 0
        key_mask = attention_mask
        if kv_cache is not None:
            runtime_gather_output = True  # megatron's inference path wants gathered logits
            key_mask = self._extend_cache_mask(kv_cache, input_ids, attention_mask)
        position_ids = self.rotary_positions(input_ids, position_ids, attention_mask, image_grid_thw, kv_cache)
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed_input(input_ids, pixel_values, image_grid_thw, strict=prefill)
        padded = seq
        if self.config.sequence_parallel:
            # [S, B, H] -> this rank's [S/TP, B, H]: the sequence is padded at the end to a multiple of TP
            # (causal attention: the real tokens never see the padding; its outputs are dropped in _finish)
            padded = sequence_parallel_length(self.config, seq)
            input_ids, position_ids, key_mask = _pad_sequence(input_ids, position_ids, key_mask, padded - seq)
            if self.pre_process:
                if decoder_input is None:
                    decoder_input = self.language_model.embedding(input_ids=input_ids, position_ids=None)
                elif padded > seq:
                    decoder_input = torch.nn.functional.pad(decoder_input, (0, 0, 0, 0, 0, padded - seq))
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        output = self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=causal_padding_mask(key_mask, padded),
            decoder_input=decoder_input,
            inference_context=kv_cache.context if kv_cache is not None else None,
            runtime_gather_output=runtime_gather_output,
        )
        if kv_cache is not None:
            kv_cache.context.sequence_len_offset += seq
        if self.post_process and padded > seq:
            output = output[:, :seq].contiguous()
        return self._finish(output, gathered=runtime_gather_output, labels=labels, loss_fn=loss_fn)

    # ---------------------------------------------------------------------------------------- outputs
    def _mask_padded_vocab(self, logits: torch.Tensor, gathered: bool) -> torch.Tensor:
        if self.padded_vocab_size == self.vocab_size:
            return logits
        width = logits.shape[-1]
        start = 0 if gathered else parallel_state.get_tensor_model_parallel_rank() * width
        real = max(0, min(width, self.vocab_size - start))
        if real == width:
            return logits
        return logits.masked_fill(torch.arange(width, device=logits.device) >= real, PADDED_VOCAB_LOGIT)

    def _finish(self, output: torch.Tensor, *, gathered: bool, labels: Optional[torch.Tensor] = None,
                loss_fn: Optional[Callable[[torch.Tensor], Any]] = None):
        """Hidden states on a non-last stage; else logits (padding masked), the per-token cross entropy of
        ``labels`` (vocab-parallel logits only), or ``loss_fn(logits)``."""
        if not self.post_process:
            return output
        logits = self._mask_padded_vocab(output, gathered=gathered)
        if labels is not None:
            if gathered:
                raise ValueError("labels need vocab-parallel logits (runtime_gather_output=False)")
            return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)
        if loss_fn is not None:
            return loss_fn(logits)
        return logits


def build_decoder_policy(
    make_policy: Callable[..., DecoderPolicy],
    dims: DecoderDims,
    *,
    what: str,
    params_dtype: Any = torch.float32,
    padded_vocab_size: Optional[int] = None,
    make_vocab_size_divisible_by: int = 128,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    perform_initialization: bool = True,
    transformer_layer_spec=None,
    config_overrides: Optional[Dict[str, Any]] = None,
) -> DecoderPolicy:
    """Build this rank's stage of a policy at the current megatron TP/PP layout; every family's builder ends
    here.

    ``megatron.core.parallel_state`` must be initialised. ``padded_vocab_size`` (take it from the checkpoint
    metadata) defaults to the vocabulary rounded up to ``make_vocab_size_divisible_by``. With
    ``perform_initialization=False`` the weights are left uninitialised (load a checkpoint next). The model
    is moved to the current CUDA device when CUDA is available.

    ``make_policy(config, tp=, dtype=, perform_initialization=, padded_vocab_size=, pre_process=,
    post_process=, transformer_layer_spec=)`` constructs the family's policy from the decoder's
    ``TransformerConfig`` (and checks/builds its own modules' configs from ``tp`` / ``dtype``); ``what``
    names the policy in errors.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if parallel_state.get_context_parallel_world_size() > 1:
        raise ValueError(f"context parallelism is not supported by the {what} policy")
    if padded_vocab_size is None:
        padded_vocab_size = pad_vocab_size(dims.vocab_size, make_vocab_size_divisible_by)
    if padded_vocab_size < dims.vocab_size:
        raise ValueError(f"padded_vocab_size={padded_vocab_size} < vocab_size={dims.vocab_size}")
    overrides = dict(config_overrides or {})
    check_parallel_layout(dims, tp=tp, pp=pp, padded_vocab_size=padded_vocab_size,
                          num_layers_in_first_pipeline_stage=overrides.get("num_layers_in_first_pipeline_stage"),
                          num_layers_in_last_pipeline_stage=overrides.get("num_layers_in_last_pipeline_stage"))
    check_knobs(overrides, num_layers=dims.num_layers, tp=tp, pp=pp)
    dtype = parse_dtype(params_dtype)
    config = decoder_transformer_config(dims, tp=tp, pp=pp, params_dtype=dtype,
                                        perform_initialization=perform_initialization, **overrides)
    policy = make_policy(
        config, tp=tp, dtype=dtype, perform_initialization=perform_initialization,
        padded_vocab_size=padded_vocab_size,
        pre_process=parallel_state.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=parallel_state.is_pipeline_last_stage() if post_process is None else post_process,
        transformer_layer_spec=transformer_layer_spec,
    )
    if dtype != torch.float32:
        policy.cast_to(dtype)
    # a policy built on the meta device (the converters: shapes only) has nothing to move
    if torch.cuda.is_available() and not any(p.is_meta for p in policy.parameters()):
        policy.cuda(torch.cuda.current_device())
    return policy
