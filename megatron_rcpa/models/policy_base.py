"""What every policy shares: the megatron glue around ``self.language_model`` (a GPTModel) and the tail of
``forward`` (padded-vocabulary masking, then logits, per-token cross entropy or a given loss).

A policy subclass sets ``language_model``, ``vocab_size``, ``padded_vocab_size``, ``pre_process`` and
``post_process``, and ends its ``forward`` with :meth:`DecoderPolicy._finish`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule

# Logit given to Megatron's padded vocabulary columns: a softmax over the padded vocabulary then equals the
# softmax over the real one (exp(-1e4) underflows to 0 in fp32 and bf16).
PADDED_VOCAB_LOGIT = -1.0e4


class DecoderPolicy(MegatronModule):
    # ------------------------------------------------------------------------------------ megatron glue
    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand the previous stage's activations in here."""
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        return self.language_model.sharded_state_dict(prefix=f"{prefix}language_model.", metadata=metadata)

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
