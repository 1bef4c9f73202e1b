"""``CompositeReward`` (registered as ``composite``): a weighted sum of rewards.

    reward = CompositeReward({"math_answer": 0.9, "format": 0.1})
    reward = CompositeReward([("math_answer", 1.0), ("format", 0.2, {"preset": "boxed"})])
    reward = get_reward("composite", rewards={"math_answer": 0.9, "format": 0.1})

Each part is resolved by :func:`~.registry.get_reward` (name, import path or callable; optional keyword
arguments as a third tuple item) and checked on its own, so a NaN is reported with the part's name. The sum is
not renormalised: the weights are used as given. ``last_components`` keeps the parts' values of the last call
for logging.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from .registry import RewardFunction, get_reward, register_reward

PartSpec = Union[Mapping[str, float], Sequence[Any]]


@register_reward("composite")
class CompositeReward:
    """Weighted sum of rewards; see the module docstring."""

    def __init__(self, rewards: PartSpec):
        items = list(rewards.items()) if isinstance(rewards, Mapping) else list(rewards)
        if not items:
            raise ValueError("CompositeReward needs at least one reward")
        self.parts: List[tuple] = []  # (label, RewardFunction, weight)
        labels: Dict[str, int] = {}
        for item in items:
            if isinstance(item, Mapping):
                spec, weight, kwargs = item["reward"], item.get("weight", 1.0), dict(item.get("kwargs", {}))
            else:
                if len(item) not in (2, 3):
                    raise ValueError(f"CompositeReward part {item!r}: expected (reward, weight[, kwargs])")
                spec, weight = item[0], item[1]
                kwargs = dict(item[2]) if len(item) == 3 else {}
            fn = get_reward(spec, **kwargs)
            w = float(weight)
            if w != w or w in (float("inf"), float("-inf")):
                raise ValueError(f"CompositeReward weight of {fn.name!r} = {weight!r}: expected a finite number")
            label = fn.name
            if label in labels:
                labels[label] += 1
                label = f"{label}#{labels[label]}"
            else:
                labels[label] = 0
            self.parts.append((label, fn, w))
        self.last_components: Optional[Dict[str, List[float]]] = None

    def components(self, responses: Sequence[str], references: Sequence[Any], **sample_fields: Any
                   ) -> Dict[str, List[float]]:
        """Each part's (unweighted, checked) values, by label."""
        return {label: fn(responses, references, **sample_fields) for label, fn, _ in self.parts}

    def __call__(self, responses: Sequence[str], references: Sequence[Any], **sample_fields: Any) -> List[float]:
        comps = self.components(responses, references, **sample_fields)
        self.last_components = comps
        total = [0.0] * len(responses)
        for label, _, w in self.parts:
            total = [t + w * v for t, v in zip(total, comps[label])]
        return total

    @property
    def weights(self) -> Dict[str, float]:
        return {label: w for label, _, w in self.parts}

    def __repr__(self) -> str:
        return "CompositeReward(" + ", ".join(f"{lbl}={w}" for lbl, _, w in self.parts) + ")"


__all__ = ["CompositeReward", "RewardFunction"]
