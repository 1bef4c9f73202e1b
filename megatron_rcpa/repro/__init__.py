"""A toy-scale reproduction of RCPA's claim, run by ``rcpa-train`` (issue 16): ``rcpa-repro``.

- :mod:`.tasks`    the general mix the base is pretrained on, the new domains (D1, D2, pluggable)
- :mod:`.rewards`  the reward the runs use (the domain's for domain samples, exact match for general ones)
- :mod:`.arms`     the arms (SFT, GRPO, fixed rho, RCPA, ...) and the cpu / gpu presets
- :mod:`.runner`   data files, base pretraining and arm runs through ``rcpa-train`` processes
- :mod:`.kl`       token KL to the base from the saved checkpoints
- :mod:`.analysis` per-eval curves, R(tau), leak, sign-off rate, tokens, wall time
- :mod:`.verdict`  criteria C1-C5 and the outcome per domain
- :mod:`.plots`, :mod:`.report`   figures, ``REPORT.md``, ``verdict.json``
- :mod:`.pipeline`, :mod:`.cli`   the whole run, the command
"""
