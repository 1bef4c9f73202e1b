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
