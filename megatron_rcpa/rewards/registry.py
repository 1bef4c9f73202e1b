"""Reward functions selected by name or import path, and the finiteness check every reward passes through.

The reward contract (batched)::

    fn(responses: list[str], references: list[str | None], **sample_fields) -> list[float]

- ``responses[i]`` is the whole response of rollout i (for RCPA: the forced reference prefix followed by the
  generated continuation; RCPA_SPEC section 2).
- ``references[i]`` is the reference text of the prompt that rollout i answers (``None`` when the sample has
  none). The G rollouts of one prompt repeat the same reference. Caption metrics also accept a list of
  reference strings per rollout (several captions per image).
- ``sample_fields`` are optional per-rollout lists of the same length (``prompts``, ``ids``, ``meta``, ...).
  A reward takes what it needs and must accept and ignore the rest (end its signature with ``**_``).
- It returns one finite float per response.

A config string selects a reward: a registered name (``"math_answer"``), an import path
(``"my_pkg.my_module:my_reward"``; ``"my_pkg.my_module.my_reward"`` also works) or a file path
(``"rewards/geo.py:compute_score"``). Functions written for verl (``compute_score(data_source, solution_str,
ground_truth, extra_info)``) or TRL (``f(prompts, completions, **columns)``) are adapted (:mod:`.adapters`,
which also lists the sample fields the trainer passes). ``get_reward`` returns a
:class:`RewardFunction` that calls the reward and then :func:`check_rewards`, so a NaN/inf or a wrong count
stops the run with an error naming the sample instead of poisoning the advantages.

Registering a new reward is one decorator::

    @register_reward("my_reward")
    def my_reward(responses, references, **_):
        return [float(r == ref) for r, ref in zip(responses, references)]

A registered class (a callable object with the same contract, e.g. :class:`~.caption.CiderDReward`) is
instantiated by ``get_reward`` with the keyword arguments given to it; a function gets them bound
(``functools.partial``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from typing import Any, Callable, Dict, List, Optional, Sequence

RewardFn = Callable[..., Sequence[float]]

REWARD_REGISTRY: Dict[str, Any] = {}

_PREFIX_CHARS = 80


class RewardError(ValueError):
    """A reward returned something unusable (NaN/inf, a non-number, or the wrong number of values)."""


def register_reward(name: str) -> Callable[[Any], Any]:
    """Decorator registering a reward function (or a class whose instances are reward functions) as ``name``."""

    def deco(obj: Any) -> Any:
        if name in REWARD_REGISTRY and REWARD_REGISTRY[name] is not obj:
            raise ValueError(f"reward name {name!r} is already registered (by {REWARD_REGISTRY[name]!r})")
        REWARD_REGISTRY[name] = obj
        return obj

    return deco


def _prefix(text: Any) -> str:
    s = str(text)
    return repr(s[:_PREFIX_CHARS] + ("..." if len(s) > _PREFIX_CHARS else ""))


def check_rewards(values: Sequence[Any], responses: Sequence[str], name: str = "reward") -> List[float]:
    """Return ``values`` as a list of Python floats, or raise :class:`RewardError`.

    Raises when the count differs from ``len(responses)``, or when a value is not a real number or is NaN/inf;
    the message names the reward, the first bad sample (its index and the first 80 characters of its
    response) and how many other samples are bad.
    """
    try:
        vals = list(values)
    except TypeError as exc:
        raise RewardError(f"{name} returned {type(values).__name__}, expected a list of floats") from exc
    if len(vals) != len(responses):
        raise RewardError(f"{name} returned {len(vals)} values for {len(responses)} responses")
    out: List[float] = []
    bad: List[int] = []
    for i, v in enumerate(vals):
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
        if not math.isfinite(f):
            bad.append(i)
        out.append(f)
    if bad:
        i = bad[0]
        more = f" (and {len(bad) - 1} more samples)" if len(bad) > 1 else ""
        raise RewardError(
            f"{name} returned a non-finite value {vals[i]!r} for sample {i}{more}; response {_prefix(responses[i])}"
        )
    return out


def _load_file_module(path: str, spec_text: str) -> Any:
    """A Python file as a module (its code runs: a reward given by file path is trusted code, like an import)."""
    import importlib.util
    import os
    import sys

    if not os.path.isfile(path):
        raise ValueError(f"reward {spec_text!r}: the file {path!r} does not exist")
    mod_name = f"_rcpa_reward_{abs(hash(os.path.abspath(path)))}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"reward {spec_text!r}: {path!r} cannot be loaded as a Python module")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception as exc:
        del sys.modules[mod_name]
        raise ValueError(f"reward {spec_text!r}: importing {path!r} failed ({type(exc).__name__}: {exc})") from exc
    return mod


def _import_object(path: str) -> Any:
    if ":" in path:
        mod_name, _, attr = path.rpartition(":")
    else:
        mod_name, _, attr = path.rpartition(".")
    if not mod_name or not attr:
        raise ValueError(f"reward import path {path!r} is malformed: expected 'package.module:function' or "
                         "'path/to/file.py:function'")
    if mod_name.endswith(".py") or "/" in mod_name or "\\" in mod_name:
        mod = _load_file_module(mod_name, path)
        mod_name = mod_name.rsplit("/", 1)[-1]
    else:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as exc:
            raise ValueError(f"reward {path!r}: cannot import module {mod_name!r} ({exc})") from exc
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {path!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


class RewardFunction:
    """A reward bound to its arguments and wrapped with :func:`check_rewards`. Call it like the reward."""

    def __init__(self, fn: RewardFn, name: str):
        self.fn = fn
        self.name = name

    def __call__(self, responses: Sequence[str], references: Sequence[Optional[Any]], **sample_fields: Any
                 ) -> List[float]:
        responses = list(responses)
        references = list(references)
        if len(references) != len(responses):
            raise RewardError(f"reward {self.name!r}: {len(responses)} responses but {len(references)} references")
        for key, value in sample_fields.items():
            if isinstance(value, (list, tuple)) and len(value) != len(responses):
                raise RewardError(
                    f"reward {self.name!r}: sample field {key!r} has {len(value)} entries for {len(responses)} "
                    "responses"
                )
        values = self.fn(responses, references, **sample_fields)
        return check_rewards(values, responses, name=f"reward {self.name!r}")

    def __repr__(self) -> str:
        return f"RewardFunction({self.name!r})"


def get_reward(spec: Any, *, api: str = "auto", **kwargs: Any) -> RewardFunction:
    """Resolve a reward by registered name, import path, or a callable, bind ``kwargs`` and wrap it.

    ``spec`` may be a registered name, ``"pkg.mod:fn"`` / ``"pkg.mod.fn"``, ``"path/to/file.py:fn"``, a
    callable, or an existing :class:`RewardFunction` (returned as is when no kwargs are given). Classes are
    instantiated with ``kwargs``; functions get them bound. Unknown names raise ``ValueError`` listing the
    registered ones. ``api`` (``auto`` | ``rcpa`` | ``verl`` | ``trl``): the function's calling convention,
    adapted by :mod:`.adapters` (``auto`` reads its signature).
    """
    from .adapters import adapt

    if isinstance(spec, RewardFunction) and not kwargs:
        return spec
    if isinstance(spec, str):
        name = spec
        if spec in REWARD_REGISTRY:
            obj = REWARD_REGISTRY[spec]
        elif ":" in spec or "." in spec:
            obj = _import_object(spec)
        else:
            known = ", ".join(sorted(REWARD_REGISTRY))
            raise ValueError(
                f"unknown reward {spec!r}: expected one of [{known}] or an import path 'package.module:function'"
            )
    elif callable(spec):
        obj = spec
        name = getattr(spec, "__name__", type(spec).__name__)
    else:
        raise TypeError(f"reward spec must be a name, an import path or a callable, got {type(spec).__name__}")
    if inspect.isclass(obj):
        fn = obj(**kwargs)
    elif not callable(obj):
        raise ValueError(f"reward {name!r} resolves to {type(obj).__name__}, which is not callable")
    elif kwargs:
        fn = functools.partial(obj, **kwargs)
    else:
        fn = obj
    return RewardFunction(adapt(fn, name, api), name)


def list_rewards() -> List[str]:
    """Names of the registered rewards."""
    return sorted(REWARD_REGISTRY)
