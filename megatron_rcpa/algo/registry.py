"""One registry per variant of the method: advantage estimators, KL estimators, loss aggregations.

A config string (``rcpa.advantage.estimator``, ``rcpa.loss.kl_type``, ``rcpa.loss.aggregation``) selects an
entry by name. Each entry holds the plain-torch reference (what ``megatron_rcpa.algo`` computes and what the
kernels are tested against) and the id of its branch in the Triton kernel of ``megatron_rcpa.ops`` (passed
to the kernel as a ``tl.constexpr``). Config validation, the reference, the kernels, their tests and the
sm_90 compile check all read these registries; nothing else lists the names.

The built-in entries are registered next to their reference functions (:mod:`.advantages`, :mod:`.loss`),
which ``megatron_rcpa.algo`` imports, so the registries are full whenever any part of the package is used.

Adding an advantage estimator is one registration plus its kernel branch, e.g. a mean-centred advantage
divided by the group size::

    # megatron_rcpa/algo/advantages.py (the reference; GroupStats holds float64 per-group statistics)
    @register_advantage_estimator("scaled", kernel_id=3)
    def _scaled(s: GroupStats) -> torch.Tensor:
        return (s.rewards - s.mean[s.index]) / s.size[s.index]

    # megatron_rcpa/ops/advantages.py, _group_adv_kernel (r, mean, nf = group size, nm1, denom in float64)
    elif EST == 3:
        a = (r - mean) / nf

``AdvantageConfig(estimator="scaled")`` then validates, ``compute_advantages`` computes it, and
``group_advantages`` runs it in the kernel; tests/ops and the sm_90 compile check pick it up from the
registry, and tests/algo asks for one hand-computed case of every registered name.
An entry registered with ``kernel_id=None`` is reference-only: the kernel path raises an error naming it.
KL estimators (``register_kl_estimator``, branch ``KL`` of ``ops.rcpa_loss._token_kernel``) work the same
way. An aggregation needs no new kernel branch: it is either uniform (every generated token gets the same
weight, ``kernel_id=AGG_UNIFORM`` with a ``kernel_scale``) or per-token (``AGG_PER_TOKEN``: the reference
weights are computed on the host and loaded by the kernel), branch ``AGG`` of ``_token_kernel``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Generic, Iterator, Optional, Tuple, TypeVar

# Aggregation branches of ops.rcpa_loss._token_kernel (its AGG constexpr).
AGG_UNIFORM = 0  # weight = kernel_scale(config, counts) on every generated token
AGG_PER_TOKEN = 1  # weight = Aggregation.weights(...) computed on the host, loaded per token


@dataclass(frozen=True)
class AdvantageEstimator:
    """``reference(stats: advantages.GroupStats) -> [N] float64`` advantages (zero-variance groups are zeroed
    by the caller); ``kernel_id`` is the ``EST`` branch of ``ops.advantages._group_adv_kernel``."""

    name: str
    reference: Callable
    kernel_id: Optional[int]


@dataclass(frozen=True)
class KLEstimator:
    """``reference(logp, ref_logp) -> per-token estimate of KL(pi || pi_ref)``; ``kernel_id`` is the ``KL``
    branch of ``ops.rcpa_loss._token_kernel``."""

    name: str
    reference: Callable
    kernel_id: Optional[int]


@dataclass(frozen=True)
class Aggregation:
    """How the per-token loss terms are summed: ``reference(gen, seq_idx, nseq, config, counts)`` gives the
    float64 weight of every token (0 off the generated set), the loss being ``sum(w * term)``.

    ``kernel_id`` is ``AGG_UNIFORM`` (then ``kernel_scale(config, counts)`` is the one weight of every
    generated token) or ``AGG_PER_TOKEN`` (the kernel loads the reference weights). ``needs_seq_ids``: the
    weights depend on the rollout of each token; ``needs_max_response_length``: they divide by
    ``LossConfig.max_response_length``, which must then be set."""

    name: str
    reference: Callable
    kernel_id: int
    needs_seq_ids: bool = False
    needs_max_response_length: bool = False
    kernel_scale: Optional[Callable] = None

    def __post_init__(self) -> None:
        if self.kernel_id not in (AGG_UNIFORM, AGG_PER_TOKEN):  # every aggregation runs in the kernel
            raise ValueError(f"aggregation {self.name!r}: kernel_id = {self.kernel_id!r}, expected "
                             f"AGG_UNIFORM ({AGG_UNIFORM}) or AGG_PER_TOKEN ({AGG_PER_TOKEN})")
        if self.kernel_id == AGG_UNIFORM and self.kernel_scale is None:
            raise ValueError(f"aggregation {self.name!r}: kernel_id = AGG_UNIFORM needs a kernel_scale")


E = TypeVar("E")


class Registry(Generic[E]):
    """Entries by name, in registration order. ``config_key`` is the config field that selects an entry (it
    appears in the errors). With ``unique_kernel_ids`` two entries may not share a kernel branch."""

    def __init__(self, what: str, config_key: str, unique_kernel_ids: bool = True) -> None:
        self.what = what
        self.config_key = config_key
        self.unique_kernel_ids = unique_kernel_ids
        self._entries: Dict[str, E] = {}

    def add(self, entry: E) -> E:
        name = entry.name
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.what}: the name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered ({self._entries[name].reference!r})")
        kid = entry.kernel_id
        if kid is not None:
            if isinstance(kid, bool) or not isinstance(kid, int) or kid < 0:
                raise ValueError(f"{self.what} {name!r}: kernel_id = {kid!r}, expected an integer >= 0 or None")
            taken = [e.name for e in self._entries.values() if e.kernel_id == kid]
            if self.unique_kernel_ids and taken:
                raise ValueError(f"{self.what} {name!r}: kernel_id = {kid} is already the branch of {taken[0]!r}")
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> E:
        """Unregister ``name`` (tests and plugins that replace an entry)."""
        return self._entries.pop(self.get(name).name)

    def get(self, name: str) -> E:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"{self.config_key} = {name!r}: unknown {self.what}; expected one of "
                             + ", ".join(repr(n) for n in self._entries)) from None

    def kernel_id(self, name: str, kernel: str) -> int:
        """The kernel branch of ``name``; an error naming the kernel when the entry is reference-only."""
        kid = self.get(name).kernel_id
        if kid is None:
            raise ValueError(f"{self.config_key} = {name!r}: this {self.what} has no branch in {kernel}; run "
                             f"it with impl='torch' or add the branch")
        return kid

    def names(self) -> Tuple[str, ...]:
        return tuple(self._entries)

    def kernel_ids(self) -> Tuple[int, ...]:
        """The distinct kernel branches in use (what the compile check builds)."""
        return tuple(sorted({e.kernel_id for e in self._entries.values() if e.kernel_id is not None}))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self._entries)})"


ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator", "rcpa.advantage.estimator")
KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator", "rcpa.loss.kl_type")
AGGREGATIONS: Registry[Aggregation] = Registry("loss aggregation", "rcpa.loss.aggregation", unique_kernel_ids=False)


def register_advantage_estimator(name: str, *, kernel_id: Optional[int]):
    """Decorator: register ``fn(stats: GroupStats) -> advantages`` under ``name`` (see the module docstring)."""
    def deco(fn: Callable) -> Callable:
        ADVANTAGE_ESTIMATORS.add(AdvantageEstimator(name, fn, kernel_id))
        return fn
    return deco


def register_kl_estimator(name: str, *, kernel_id: Optional[int]):
    """Decorator: register ``fn(logp, ref_logp) -> per-token KL estimate`` under ``name``."""
    def deco(fn: Callable) -> Callable:
        KL_ESTIMATORS.add(KLEstimator(name, fn, kernel_id))
        return fn
    return deco


def register_aggregation(name: str, *, kernel_id: int, needs_seq_ids: bool = False,
                         needs_max_response_length: bool = False, kernel_scale: Optional[Callable] = None):
    """Decorator: register ``fn(gen, seq_idx, nseq, config, counts) -> per-token weights`` under ``name``."""
    def deco(fn: Callable) -> Callable:
        AGGREGATIONS.add(Aggregation(name, fn, kernel_id, needs_seq_ids, needs_max_response_length, kernel_scale))
        return fn
    return deco
