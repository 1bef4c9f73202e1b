"""The per-rollout sample fields the trainer passes to every reward (listed in :mod:`.adapters`)."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence


def sample_fields(samples: Sequence[Any]) -> Dict[str, List[Any]]:
    """``prompts``, ``ids``, ``data_sources``, ``extra_infos``, ``all_references`` and ``meta`` of each sample
    (one entry per rollout: pass the sample of each rollout)."""
    out: Dict[str, List[Any]] = {k: [] for k in ("prompts", "ids", "data_sources", "extra_infos", "all_references",
                                                  "meta")}
    for s in samples:
        meta = dict(getattr(s, "meta", None) or {})
        refs = meta.get("all_references") or ([s.reference] if getattr(s, "reference", None) is not None else [])
        out["prompts"].append(s.prompt)
        out["ids"].append(s.id)
        out["data_sources"].append(getattr(s, "data_source", None) or meta.get("data_source") or "")
        out["extra_infos"].append(getattr(s, "extra_info", None) or meta.get("extra_info") or {})
        out["all_references"].append(list(refs))
        out["meta"].append(meta)
    return out
