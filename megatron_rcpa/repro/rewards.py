"""The reward the reproduction's runs train and validate with (``reward.name =
"megatron_rcpa.repro.rewards:repro_reward"``, ``reward.kwargs.domain = "d1"``): each sample is judged by its
data source, the domain's own reward for ``data_source == "domain"`` and exact match for the general tasks."""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence

from megatron_rcpa.repro.tasks import DOMAIN_SOURCE, Domain, general_reward, load_domain

__all__ = ["repro_reward"]


@functools.cache
def _domain(spec: str) -> Domain:
    return load_domain(spec)


def repro_reward(responses: Sequence[str], references: Sequence[Optional[str]], *, domain: str,
                 data_sources: Optional[Sequence[str]] = None, **_) -> List[float]:
    """One reward in [0, 1] per response (see the module docstring); ``domain`` is a
    :func:`~megatron_rcpa.repro.tasks.load_domain` spec."""
    if data_sources is None:
        raise ValueError("repro_reward needs each sample's data_source (rows of the reproduction's JSONL files)")
    dom = _domain(domain)
    out = []
    for resp, ref, src in zip(responses, references, data_sources):
        if ref is None:
            raise ValueError(f"repro_reward: a {src!r} sample has no reference")
        out.append(float(dom.reward(resp, ref) if src == DOMAIN_SOURCE else general_reward(resp, ref)))
    return out
