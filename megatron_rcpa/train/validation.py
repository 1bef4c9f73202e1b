"""Validation on a held-out set: what the model does alone (no forced prefix), per data source.

Every ``run.val_interval`` steps (and at step 0 with ``run.val_before_train``) the policy answers each held-out
prompt once, greedily by default (``run.val_greedy``; else with the rollout temperature / top-p), through the
same rollout engine, prompt format and reward function as training. Each data-parallel rank answers its share
(sample i goes to rank ``i % DP``); the results are gathered, so the numbers do not depend on the layout:

- ``val/reward`` and ``val/accuracy`` over the whole set; ``val/<data_source>/reward`` and
  ``val/<data_source>/accuracy`` per data source (accuracy: the curriculum's success rule, i.e.
  ``reward >= rcpa.curriculum.success_threshold`` when the familiarity signal is ``success``, else the reward
  clipped to [0, 1] averaged);
- ``val/response_length``;
- the first ``run.val_generations`` generations to ``<run.output_dir>/generations/step_<N>.jsonl`` (id,
  data_source, prompt, response, reference, reward), written by one rank.

This is the baseline the RCPA claim is measured against: domain accuracy before and during training.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from typing import Any, Callable, Dict, List, Sequence

import torch

from megatron_rcpa.rewards.fields import sample_fields

__all__ = ["validate", "GENERATIONS_DIR"]

GENERATIONS_DIR = "generations"


def _source_key(name: str) -> str:
    """A data source as a metric-name component (``val/<source>/reward``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "default"


def validate(ctx, samples: Sequence[Any], format_fn: Callable, reward, decode: Callable, step: int, *,
             greedy: bool = True, max_generations: int = 16, write: bool = False) -> Dict[str, float]:
    """Run the held-out ``samples`` (all of them, identical on every rank) and return the ``val/*`` metrics
    (identical on every rank). ``reward`` is the training reward (``RewardFunction``), ``decode`` the
    tokenizer's decode; ``write``: this rank writes the generations file."""
    groups = ctx.groups
    mine = list(range(groups.dp_rank, len(samples), groups.dp_size))
    my_samples = [samples[i] for i in mine]
    prompts = [format_fn(s) for s in my_samples]
    engine = ctx.engine
    saved = engine.params
    if greedy:
        engine.params = type(saved)(temperature=saved.temperature, top_p=saved.top_p,
                                    max_new_tokens=saved.max_new_tokens, greedy=True)
    try:
        rollouts = engine.generate(prompts, [0] * len(prompts), 1, step=10_000_019 + step,
                                   dp_rank=groups.dp_rank) if prompts else []
    finally:
        engine.params = saved
    responses = [decode(r.response_tokens) for r in rollouts]
    refs = [p.reference for p in prompts]
    rewards = reward(responses, refs, **sample_fields(my_samples)) if prompts else []
    success = [ctx.curriculum.success(r) for r in rewards]
    rows = [dict(index=i, id=str(s.id), data_source=str(getattr(s, "data_source", None)
                                                           or s.meta.get("data_source") or "default"),
                 prompt=s.prompt, response=resp, reference=s.reference, reward=float(rw), success=float(sc),
                 length=len(r.response_tokens))
            for i, s, resp, rw, sc, r in zip(mine, my_samples, responses, rewards, success, rollouts)]
    if groups.dp_size > 1:
        parts: List[Any] = [None] * groups.dp_size
        torch.distributed.all_gather_object(parts, rows, group=groups.dp_group)
        rows = [row for part in parts for row in part]
    rows.sort(key=lambda row: row["index"])
    if not rows:
        return {}
    metrics: Dict[str, float] = {
        "val/reward": sum(r["reward"] for r in rows) / len(rows),
        "val/accuracy": sum(r["success"] for r in rows) / len(rows),
        "val/response_length": sum(r["length"] for r in rows) / len(rows),
        "val/samples": float(len(rows)),
    }
    by_source: Dict[str, List[dict]] = defaultdict(list)
    for r in rows:
        by_source[r["data_source"]].append(r)
    if len(by_source) > 1 or "default" not in by_source:
        for name, rs in sorted(by_source.items()):
            key = _source_key(name)
            metrics[f"val/{key}/reward"] = sum(r["reward"] for r in rs) / len(rs)
            metrics[f"val/{key}/accuracy"] = sum(r["success"] for r in rs) / len(rs)
    if write:
        out_dir = os.path.join(ctx.cfg.run.output_dir, GENERATIONS_DIR)
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"step_{step}.jsonl")
        with open(path + ".tmp", "w") as f:
            for r in rows[:max_generations]:
                f.write(json.dumps({k: r[k] for k in ("id", "data_source", "prompt", "response", "reference",
                                                      "reward")}) + "\n")
        os.replace(path + ".tmp", path)
    return metrics


def validation_line(step: int, metrics: Dict[str, float]) -> str:
    """One line for the console: ``val step N: reward=... acc=... [source acc=...]``."""
    parts = [f"val step {step}: reward={metrics['val/reward']:.3f} acc={metrics['val/accuracy']:.3f} "
             f"len={metrics['val/response_length']:.1f} n={int(metrics['val/samples'])}"]
    for k, v in metrics.items():
        if k.endswith("/accuracy") and k.count("/") == 2:
            parts.append(f"{k.split('/')[1]}={v:.3f}")
    return " ".join(parts)
