"""Incremental decoding with a KV cache, for rollouts.

    cache = KVCache(max_batch_size=B, max_sequence_length=prompt_len + max_new)
    logits = policy(input_ids=prompt, pixel_values=pv, image_grid_thw=grid, kv_cache=cache)   # prefill
    for _ in range(max_new):
        logits = policy(input_ids=next_ids[:, None], kv_cache=cache)                          # decode step

:class:`KVCache` wraps megatron's ``StaticInferenceContext`` (its constructor and the "last token logits
only" switch differ between megatron-core 0.16 and 0.19; both are handled here) and remembers the 3-D
position ids and the padding mask of everything cached, so a decode step only passes the new tokens.
Each rank (each pipeline stage) keeps its own cache; one micro-batch per cache.

:func:`greedy_generate` is the reference decode loop for a single pipeline stage (PP=1, any TP);
:func:`pipeline_greedy_generate` the same through megatron's PP schedule (any PP).
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["KVCache", "gather_vocab_logits", "greedy_generate", "pipeline_greedy_generate"]


class KVCache:
    """Static KV cache for one micro-batch of at most ``max_batch_size`` rows and ``max_sequence_length`` tokens."""

    def __init__(self, max_batch_size: int, max_sequence_length: int) -> None:
        from megatron.core.inference.contexts.static_context import StaticInferenceContext

        context = StaticInferenceContext(max_batch_size, max_sequence_length)
        # Every position's logits, not only the last one (megatron 0.16 keeps the flag on the context,
        # 0.19 on context.config).
        inner = getattr(context, "config", None)
        if inner is not None and hasattr(inner, "materialize_only_last_token_logits"):
            inner.materialize_only_last_token_logits = False
        if "materialize_only_last_token_logits" in vars(context):
            context.materialize_only_last_token_logits = False
        self.context = context
        self.max_batch_size = int(max_batch_size)
        self.max_sequence_length = int(max_sequence_length)
        self.position_ids: Optional[torch.Tensor] = None  # [3, B, T] of the cached tokens
        self.attention_mask: Optional[torch.Tensor] = None  # [B, T] bool, False = padding
        self.next_position: Optional[torch.Tensor] = None  # [B] position of the next token

    @property
    def seq_len(self) -> int:
        """Number of tokens cached so far."""
        return int(self.context.sequence_len_offset)

    def reset(self) -> None:
        """Forget the cached tokens (keeps the allocated key/value buffers)."""
        self.context.reset()
        self.position_ids = self.attention_mask = self.next_position = None


def gather_vocab_logits(logits: torch.Tensor, vocab_size: Optional[int] = None) -> torch.Tensor:
    """All-gather vocab-parallel logits [..., V/TP] over TP -> [..., V] (padding columns dropped if
    ``vocab_size`` is given). Not differentiable through the gather; for evaluation and sampling."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        torch.distributed.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits[..., :vocab_size] if vocab_size is not None else logits


@torch.no_grad()
def greedy_generate(policy, input_ids: torch.Tensor, *, max_new_tokens: int, pixel_values=None,
                    image_grid_thw=None, attention_mask=None, return_logits: bool = False):
    """Greedy decoding with a KV cache on a single pipeline stage (PP=1; any TP).

    Returns the new tokens [B, max_new_tokens] and, with ``return_logits``, the gathered logits
    [B, max_new_tokens, vocab] that chose them.
    """
    if not (policy.pre_process and policy.post_process):
        raise ValueError("greedy_generate runs a whole model on one stage (PP=1); with PP use "
                         "pipeline_greedy_generate")
    batch, prompt_len = input_ids.shape
    cache = KVCache(batch, prompt_len + max_new_tokens)
    logits = policy(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                    attention_mask=attention_mask, kv_cache=cache)
    tokens, chosen_logits = [], []
    for step in range(max_new_tokens):
        last = logits[:, -1, : policy.vocab_size]  # with a KV cache the policy returns TP-gathered logits
        next_ids = last.argmax(dim=-1)
        tokens.append(next_ids)
        chosen_logits.append(last)
        if step + 1 < max_new_tokens:
            logits = policy(input_ids=next_ids.unsqueeze(1), kv_cache=cache)
    out = torch.stack(tokens, dim=1)
    return (out, torch.stack(chosen_logits, dim=1)) if return_logits else out


@torch.no_grad()
def pipeline_greedy_generate(policy, input_ids: torch.Tensor, *, max_new_tokens: int, return_logits: bool = False,
                             **prompt_inputs):
    """Greedy decoding through the pipeline schedule (any PP, any TP): every stage keeps its own KV cache, the
    last stage picks each token and broadcasts it over the PP group. Every stage calls it with the same
    arguments; ``prompt_inputs`` (``pixel_values``, ``image_grid_thw``, ``attention_mask``) go to the prefill.

    Returns the new tokens [B, max_new_tokens] on every stage and, with ``return_logits``, the gathered
    logits [B, max_new_tokens, vocab] that chose them on the last stage (None on the others).
    """
    from megatron.core import parallel_state

    from megatron_rcpa.models.pipeline import pipeline_forward

    batch, prompt_len = input_ids.shape
    cache = KVCache(batch, prompt_len + max_new_tokens)
    step_input = dict(prompt_inputs, input_ids=input_ids, kv_cache=cache)
    tokens, logits = [], []
    for _ in range(max_new_tokens):
        outputs = pipeline_forward(policy, [step_input], seq_length=step_input["input_ids"].shape[1],
                                   micro_batch_size=batch)
        next_ids = torch.empty(batch, dtype=torch.long, device=input_ids.device)
        if outputs is not None:
            last = outputs[0][:, -1, : policy.vocab_size]
            logits.append(last)
            next_ids = last.argmax(dim=-1)
        torch.distributed.broadcast(next_ids, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
        tokens.append(next_ids)
        step_input = {"input_ids": next_ids.unsqueeze(1), "kv_cache": cache}
    out = torch.stack(tokens, dim=1)
    return (out, torch.stack(logits, dim=1) if logits else None) if return_logits else out
