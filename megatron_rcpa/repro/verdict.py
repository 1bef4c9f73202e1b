"""The verdict of the reproduction, computed per domain from the arms' results (issue 16's rules, verbatim):

- **C1 collapse**: GRPO's zero-variance fraction >= 0.95 over the run (the mean over its steps, every seed) and
  its final domain accuracy <= 0.05 (every seed);
- **C2 RCPA learns**: RCPA reaches tau = 0.9 domain accuracy in every seed;
- **C3 SFT forgets**: R_SFT(tau) <= base - 0.2 (base = the general accuracy of the base model; R averaged over
  seeds; the SFT run of the shared learning rate);
- **C4 RCPA retains more**: R_RCPA(tau) - R_SFT*(tau) >= 0.10 with a bootstrap 95% CI above 0, SFT* = the SFT
  arm of the sweep with the highest R(tau) (the only one on the CPU preset). The CI resamples the held-out
  general samples (paired: both arms answer the same ones) and, with several seeds, the seeds too;
- **C5 the curriculum matters**: vs fixed rho, RCPA needs >= 20% fewer steps to tau, or its R(tau) is >= 0.05
  higher.

Outcome: **invalid toy** when C1 or C3 fails (the toy does not show the premise: claim nothing, redesign);
else **reproduced** when C1-C4 hold; else **refuted** when SFT*'s R(tau) is higher than RCPA's by >= 0.1;
else **partly** when C1-C3 hold (C4 fails). The rules leave one case open: C1 and C3 hold but RCPA never
reaches tau (C2 fails) and the refutation rule cannot be applied (RCPA has no R(tau)); that is reported as
**not reproduced** (C2 failed), a separate word so that no rule is stretched. R(tau) = the general
accuracy at the first evaluation where domain accuracy >= tau (an arm that never gets there has none).
"""

from __future__ import annotations

import math
import random
from typing import Dict, List, Optional, Sequence

from megatron_rcpa.repro.analysis import TAU, ArmResult, mean_finite

__all__ = ["domain_verdict", "bootstrap_diff", "R", "steps_to_tau"]

ZV_MIN, GRPO_FINAL_MAX, FORGET, C4_MARGIN, C5_STEPS, C5_R, REFUTE = 0.95, 0.05, 0.2, 0.10, 0.20, 0.05, 0.10
N_BOOT = 2000


def R(results: Sequence[ArmResult], tau: float = TAU) -> Optional[float]:
    """Mean R(tau) over the seeds that reach tau; None when none does."""
    vals = [r.reach(tau).general_acc for r in results if r.reach(tau) is not None]
    return sum(vals) / len(vals) if vals else None


def steps_to_tau(results: Sequence[ArmResult], tau: float = TAU) -> Optional[float]:
    """Mean step of the first evaluation at tau over the seeds; None if any seed never gets there."""
    pts = [r.reach(tau) for r in results]
    if not pts or any(p is None for p in pts):
        return None
    return sum(p.step for p in pts) / len(pts)


def bootstrap_diff(a: Sequence[ArmResult], b: Sequence[ArmResult], tau: float = TAU, n: int = N_BOOT,
                   seed: int = 0) -> Optional[Dict[str, float]]:
    """Bootstrap of R_a(tau) - R_b(tau): paired over the held-out general samples (both arms answer the same
    ones, in the same order), and over the seeds both arms reached tau in when there are several. Returns
    ``{"diff", "lo", "hi"}`` (95% percentile interval) or None when no seed has both."""
    by_seed_a = {r.seed: r.reach(tau) for r in a}
    by_seed_b = {r.seed: r.reach(tau) for r in b}
    seeds = sorted(s for s in by_seed_a if by_seed_a[s] is not None and by_seed_b.get(s) is not None)
    if not seeds:
        return None
    pairs = []
    for s in seeds:
        ga, gb = by_seed_a[s].general_success, by_seed_b[s].general_success
        if len(ga) != len(gb):
            raise ValueError(f"seed {s}: the arms answered {len(ga)} and {len(gb)} general samples; the bootstrap "
                             "pairs them, so both must answer the same held-out set")
        pairs.append([x - y for x, y in zip(ga, gb)])
    point = sum(sum(p) / len(p) for p in pairs) / len(pairs)
    rng = random.Random(seed)
    stats = []
    for _ in range(n):
        chosen = [pairs[rng.randrange(len(pairs))] for _ in pairs] if len(pairs) > 1 else pairs
        tot = 0.0
        for p in chosen:
            tot += sum(p[rng.randrange(len(p))] for _ in p) / len(p)
        stats.append(tot / len(chosen))
    stats.sort()
    return {"diff": point, "lo": stats[int(0.025 * n)], "hi": stats[min(n - 1, int(math.ceil(0.975 * n)) - 1)],
            "n_boot": n, "seeds": len(pairs), "samples": len(pairs[0])}


def _sft_arms(results: Dict[str, List[ArmResult]]) -> List[str]:
    return [name for name in results if name == "sft" or name.startswith("sft_lr")]


def domain_verdict(results: Dict[str, List[ArmResult]], base_general: float, tau: float = TAU) -> dict:
    """The criteria and the outcome for one domain. ``results``: arm name -> its runs (one per seed)."""
    for need in ("grpo", "rcpa", "sft"):
        if need not in results or not results[need]:
            raise ValueError(f"the verdict needs the {need!r} arm; have {sorted(results)}")
    c: Dict[str, dict] = {}
    grpo = results["grpo"]
    zv = mean_finite([mean_finite(r.train["zero_var_frac"]) for r in grpo])
    g_final = max(r.final.domain_acc for r in grpo)
    c["C1"] = {"pass": bool(zv >= ZV_MIN and g_final <= GRPO_FINAL_MAX), "grpo_zero_var_frac": zv,
               "grpo_final_domain_acc_max": g_final, "rule": f"zero_var_frac >= {ZV_MIN} and final acc <= "
                                                             f"{GRPO_FINAL_MAX}"}
    rcpa = results["rcpa"]
    reached = [r.reach(tau) is not None for r in rcpa]
    c["C2"] = {"pass": all(reached), "seeds_reaching_tau": sum(reached), "seeds": len(rcpa),
               "rule": f"RCPA reaches domain accuracy {tau} in every seed"}
    r_sft = R(results["sft"], tau)
    c["C3"] = {"pass": bool(r_sft is not None and r_sft <= base_general - FORGET), "R_sft": r_sft,
               "base_general": base_general, "rule": f"R_SFT(tau) <= base - {FORGET}",
               "note": None if r_sft is not None else "SFT never reached tau: R_SFT undefined"}
    sft_r = {name: R(results[name], tau) for name in _sft_arms(results)}
    best = max((n for n in sft_r if sft_r[n] is not None), key=lambda n: sft_r[n], default=None)
    r_rcpa = R(rcpa, tau)
    boot = bootstrap_diff(rcpa, results[best], tau) if best is not None and r_rcpa is not None else None
    diff = (r_rcpa - sft_r[best]) if (best is not None and r_rcpa is not None) else None
    c["C4"] = {"pass": bool(diff is not None and diff >= C4_MARGIN and boot is not None and boot["lo"] > 0),
               "R_rcpa": r_rcpa, "best_sft_arm": best, "R_best_sft": sft_r.get(best) if best else None,
               "R_sft_by_lr": sft_r, "diff": diff, "bootstrap": boot,
               "rule": f"R_RCPA - R_SFT* >= {C4_MARGIN} with the bootstrap 95% CI above 0"}
    if "fixed_rho" in results and results["fixed_rho"]:
        fixed = results["fixed_rho"]
        s_r, s_f = steps_to_tau(rcpa, tau), steps_to_tau(fixed, tau)
        r_f = R(fixed, tau)
        faster = s_r is not None and (s_f is None or s_r <= (1.0 - C5_STEPS) * s_f)
        better = r_rcpa is not None and r_f is not None and r_rcpa - r_f >= C5_R
        c["C5"] = {"pass": bool(faster or better), "steps_rcpa": s_r, "steps_fixed": s_f, "R_rcpa": r_rcpa,
                   "R_fixed": r_f, "rule": f">= {C5_STEPS:.0%} fewer steps to tau or R(tau) >= {C5_R} higher "
                                           "than fixed rho"}
    else:
        c["C5"] = {"pass": None, "note": "no fixed_rho arm"}
    ok = {k: bool(v["pass"]) for k, v in c.items()}
    if not (ok["C1"] and ok["C3"]):
        outcome = "invalid toy"
        why = "C1 or C3 fails: the toy does not show the premise (GRPO collapse and SFT forgetting); claim nothing"
    elif ok["C1"] and ok["C2"] and ok["C3"] and ok["C4"]:
        outcome, why = "reproduced", "C1-C4 hold"
    elif diff is not None and -diff >= REFUTE:
        outcome, why = "refuted", f"SFT*'s R(tau) is higher than RCPA's by {-diff:.3f} >= {REFUTE}"
    elif ok["C2"]:
        outcome, why = "partly", "C1-C3 hold, C4 fails"
    else:
        outcome, why = "not reproduced", "C1 and C3 hold but RCPA never reaches tau (C2 fails)"
    return {"outcome": outcome, "why": why, "criteria": c, "tau": tau}
