"""``PromptSampler``: deterministic, resumable batches of prompts, sharded over data-parallel ranks.

Epoch e visits the dataset in the order ``permutation(seed, e)`` (a shuffle seeded by the string
``"{seed}:{e}"``, so it depends on nothing but the seed and the epoch; identity order when
``shuffle=False``). Every step takes the next ``batch_size * dp_size`` indices of that order (the global
batch) and rank r keeps the block ``[r * batch_size, (r + 1) * batch_size)`` of it, so within a step and
within an epoch ranks never share an index. With ``drop_last`` (default) the tail of an epoch that cannot fill
a global batch is skipped; without it the last batch is completed from the start of the same epoch's order.

A sample that cannot be loaded when its batch is served (:class:`~.readers.SampleLoadError`: an image that
passed the read-time check but does not decode) is logged and replaced by the first loadable sample after it
in index order (i + 1, i + 2, ... modulo the dataset size), so the batch keeps its size, the run goes on, and
the replacement is the same in a resumed run. An ``accept(sample) -> Optional[str]`` hook (e.g. the trainer's
exact prompt-token check) refuses a loaded sample by returning a reason from ``SKIP_REASONS``
(``prompt_too_long``...): it is replaced the same way, counted in ``rejected`` (and in the dataset's
``stats`` when it has :class:`~.sample.DataStats`), and never served again. The hook is asked once per index and
must be deterministic, so that a resumed run (which asks again) serves the same replacements.

The state is the epoch and the cursor (the number of indices of the epoch's order already served), plus what
must not change across a resume (seed, shuffle, dataset length). ``state_dict()`` after k batches,
``load_state_dict()`` into a fresh sampler, and the next batch is the one the first sampler would have
served. The cursor counts global indices, so a run may resume with another ``dp_size`` as long as it keeps
the same global batch size.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set

from .readers import SampleLoadError
from .sample import SKIP_REASONS, DataStats

logger = logging.getLogger(__name__)

STATE_VERSION = 1


def prompt_length_check(format_fn: Callable[[Any], Any], max_prompt_tokens: int) -> Callable[[Any], Optional[str]]:
    """An ``accept`` hook: ``prompt_too_long`` when ``format_fn(sample).prompt_ids`` (the trainer passes its
    family's ``format``: the prompt as the policy sees it, image tokens included) is longer than
    ``max_prompt_tokens``; the readers' character bound (``max_prompt_chars``) only catches the extreme cases."""
    if isinstance(max_prompt_tokens, bool) or not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1:
        raise ValueError(f"prompt_length_check: max_prompt_tokens = {max_prompt_tokens!r}: expected an integer >= 1")

    def accept(sample: Any) -> Optional[str]:
        return "prompt_too_long" if len(format_fn(sample).prompt_ids) > max_prompt_tokens else None

    return accept


def prompt_truncator(format_fn: Callable[[Any], Any], max_prompt_tokens: int) -> Callable[[Any], Optional[Any]]:
    """``data.long_prompts=truncate``: ``sample`` itself when ``format_fn(sample)`` fits in ``max_prompt_tokens``,
    else a copy whose prompt text keeps its longest tail that fits (the question usually ends a prompt; the
    images and the chat structure are kept whole), or None when even an empty text does not fit (too many
    image tokens)."""
    import dataclasses

    def fits(sample: Any) -> bool:
        return len(format_fn(sample).prompt_ids) <= max_prompt_tokens

    def truncate(sample: Any) -> Optional[Any]:
        if fits(sample):
            return sample
        text = sample.prompt
        lo, hi = 0, len(text)  # characters dropped from the left: lo does not fit, hi (all dropped) may
        if not fits(dataclasses.replace(sample, prompt="")):
            return None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(dataclasses.replace(sample, prompt=text[mid:])):
                hi = mid
            else:
                lo = mid
        meta = dict(sample.meta, truncated_prompt_chars=hi)
        return dataclasses.replace(sample, prompt=text[hi:], meta=meta)

    return truncate


class PromptSampler:
    """Batches of this rank's samples (``next_batch``) or indices (``next_indices``); iterating never ends."""

    def __init__(self, dataset: Sequence[Any], batch_size: int, seed: int = 0, shuffle: bool = True,
                 dp_rank: int = 0, dp_size: int = 1, drop_last: bool = True,
                 accept: Optional[Callable[[Any], Optional[str]]] = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"PromptSampler.batch_size = {batch_size!r}: expected an integer >= 1")
        if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
            raise ValueError(f"PromptSampler.dp_size = {dp_size!r}: expected an integer >= 1")
        if isinstance(dp_rank, bool) or not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
            raise ValueError(f"PromptSampler.dp_rank = {dp_rank!r}: expected 0 <= dp_rank < dp_size = {dp_size}")
        self.dataset = dataset
        self.num_samples = len(dataset)
        if self.num_samples == 0:
            raise ValueError("PromptSampler: the dataset is empty")
        self.batch_size = batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        if self.drop_last and self.num_samples < self.global_batch_size:
            raise ValueError(
                f"PromptSampler: the dataset has {self.num_samples} samples, fewer than one global batch "
                f"(batch_size {batch_size} x dp_size {dp_size} = {self.global_batch_size}); use drop_last=False"
            )
        self.epoch = 0
        self.cursor = 0
        self.batches_served = 0
        self._order_epoch = -1
        self._order: List[int] = []
        self.accept = accept
        self.unloadable: Set[int] = set()  # indices that raised SampleLoadError or were refused by accept
        self.rejected: Counter = Counter()  # accept's reasons -> number of distinct samples refused
        self._accepted: Set[int] = set()  # indices the hook accepted (asked once per index)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.dp_size

    @property
    def batches_per_epoch(self) -> int:
        n, g = self.num_samples, self.global_batch_size
        return n // g if self.drop_last else -(-n // g)

    def permutation(self, epoch: int) -> List[int]:
        """The visiting order of ``epoch`` (cached for the current epoch)."""
        if epoch != self._order_epoch:
            order = list(range(self.num_samples))
            if self.shuffle:
                random.Random(f"{self.seed}:{epoch}").shuffle(order)
            self._order, self._order_epoch = order, epoch
        return self._order

    def next_global_indices(self) -> List[int]:
        """The next global batch (all ranks' indices, rank-major), advancing the state."""
        n, g = self.num_samples, self.global_batch_size
        order = self.permutation(self.epoch)
        idx = order[self.cursor : self.cursor + g]
        k = 0
        while len(idx) < g:  # drop_last=False: complete from the start of this epoch's order
            idx.append(order[k % n])
            k += 1
        self.cursor += g
        if self.cursor >= n or (self.drop_last and self.cursor + g > n):
            self.epoch += 1
            self.cursor = 0
        self.batches_served += 1
        return idx

    def next_indices(self) -> List[int]:
        """This rank's indices of the next global batch."""
        idx = self.next_global_indices()
        return idx[self.dp_rank * self.batch_size : (self.dp_rank + 1) * self.batch_size]

    def next_batch(self) -> List[Any]:
        """This rank's samples of the next global batch (unloadable ones replaced, see the module docstring)."""
        return [self.load(i) for i in self.next_indices()]

    def load(self, i: int) -> Any:
        """Sample i, or (deterministically) the next loadable and accepted one (see the module docstring)."""
        for k in range(self.num_samples):
            j = (i + k) % self.num_samples
            if j in self.unloadable:
                continue
            try:
                sample = self.dataset[j]
            except SampleLoadError as exc:
                self.unloadable.add(j)
                logger.warning("PromptSampler: skipping unloadable sample at index %d: %s", j, exc)
                continue
            if self.accept is None or j in self._accepted:
                return sample
            reason = self.accept(sample)
            if reason is None:
                self._accepted.add(j)
                return sample
            self._reject(j, sample, reason)
        raise RuntimeError(f"PromptSampler: none of the {self.num_samples} samples can be loaded and accepted "
                           f"(refused: {dict(self.rejected)})")

    def _reject(self, j: int, sample: Any, reason: Any) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"PromptSampler: the accept hook returned {reason!r} for sample at index {j}: expected "
                             f"None or one of {SKIP_REASONS}")
        self.unloadable.add(j)
        self.rejected[reason] += 1
        sid = getattr(sample, "id", j)
        stats = getattr(self.dataset, "stats", None)
        if isinstance(stats, DataStats):
            stats.skip(reason, sid)
            stats.rows_kept -= 1
        logger.warning("PromptSampler: skipping sample %r at index %d: %s", sid, j, reason)

    length_check = staticmethod(prompt_length_check)  # PromptSampler(..., accept=PromptSampler.length_check(f, n))

    def __iter__(self) -> Iterator[List[Any]]:
        return self

    def __next__(self) -> List[Any]:
        return self.next_batch()

    def state_dict(self) -> Dict[str, Any]:
        """Plain ints/bools: JSON- and ``torch.save``-friendly."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "cursor": self.cursor,
                "batches_served": self.batches_served, "seed": self.seed, "shuffle": self.shuffle,
                "num_samples": self.num_samples, "global_batch_size": self.global_batch_size,
                "drop_last": self.drop_last}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from ``state``; raises ``ValueError`` naming the key when the run's data or order differ."""
        for key in ("seed", "shuffle", "num_samples", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"PromptSampler.load_state_dict: {key} = {state[key]!r} in the checkpoint but "
                    f"{getattr(self, key)!r} in this run; the visiting order would differ"
                )
        if "global_batch_size" in state and state["global_batch_size"] != self.global_batch_size:
            raise ValueError(
                f"PromptSampler.load_state_dict: global_batch_size = {state['global_batch_size']} in the checkpoint "
                f"but {self.global_batch_size} in this run (batch_size x dp_size must stay the same)"
            )
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor < self.num_samples:
            raise ValueError(f"PromptSampler.load_state_dict: epoch = {epoch}, cursor = {cursor} out of range "
                             f"for {self.num_samples} samples")
        self.epoch, self.cursor = epoch, cursor
        self.batches_served = int(state.get("batches_served", 0))
