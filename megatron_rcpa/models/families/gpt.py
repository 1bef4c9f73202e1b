"""The ``gpt`` family: the profiler's tiny megatron GPT (``model.tiny=true`` in tools/profile_throughput.py).

It has no HF architecture, no checkpoint format and no prompt format: rcpa-train refuses it.
"""

from __future__ import annotations

from megatron_rcpa.models.families import Family, register

GPT = register(Family(
    name="gpt",
    description="the profiler's tiny megatron GPT (tools/profile_throughput.py with model.tiny=true only)",
    trainable=False,
))
