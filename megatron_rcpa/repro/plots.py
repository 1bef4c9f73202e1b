"""The reproduction's figures (matplotlib, Agg), per domain, into ``<report>/plots/``:

- ``<domain>_domain_acc.png``: held-out domain accuracy vs step, every arm (tau dashed);
- ``<domain>_general_acc.png``: mean general accuracy vs step (the base's level dashed);
- ``<domain>_zero_var_rho.png``: zero-variance fraction of the RL arms, with rho on a second axis;
- ``<domain>_frontier.png``: general vs domain accuracy trajectories of every arm, the base at (0, base);
- ``<domain>_leak.png``: leak (general answers holding a domain character, solid) and general answers that never
  stop (dotted) vs step;
- ``r_tau.png``: R(tau) per arm and domain with the bootstrap 95% CI of its difference to SFT*.
Several seeds: the mean curve, each seed thin.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional

from megatron_rcpa.repro.analysis import TAU, ArmResult

__all__ = ["write_plots"]

_COLORS = {"sft": "tab:red", "grpo": "tab:gray", "fixed_rho": "tab:orange", "rcpa": "tab:blue",
           "rcpa_kl": "tab:purple", "rcpa_no_imit": "tab:cyan"}


def _color(arm: str) -> Optional[str]:
    return _COLORS.get(arm, "tab:pink" if arm.startswith("sft_lr") else None)


def _mean_curve(runs: List[ArmResult], attr: str):
    steps = sorted({e.step for r in runs for e in r.evals})
    ys = []
    for s in steps:
        vals = [getattr(e, attr) for r in runs for e in r.evals if e.step == s]
        ys.append(sum(vals) / len(vals))
    return steps, ys


def write_plots(report_dir: str, results: Dict[str, Dict[str, List[ArmResult]]], base_general: float,
                verdicts: Dict[str, dict], labels: Dict[str, str]) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    out_dir = os.path.join(report_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    for dom, arms in results.items():
        for attr, name, ylabel, hline in (("domain_acc", "domain_acc", "held-out domain accuracy", TAU),
                                          ("general_acc", "general_acc", "mean general accuracy", base_general)):
            fig, ax = plt.subplots(figsize=(6.4, 4.0))
            for arm, runs in arms.items():
                for r in runs if len(runs) > 1 else []:
                    ax.plot([e.step for e in r.evals], [getattr(e, attr) for e in r.evals], color=_color(arm),
                            lw=0.6, alpha=0.4)
                xs, ys = _mean_curve(runs, attr)
                ax.plot(xs, ys, marker=".", color=_color(arm), label=labels.get(arm, arm))
            ax.axhline(hline, ls="--", color="k", lw=0.8)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.set_ylim(-0.03, 1.03)
            ax.set_title(f"{dom}: {ylabel}")
            ax.legend(fontsize=8)
            save(fig, f"{dom}_{name}.png")

        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        ax2 = ax.twinx()
        for arm, runs in arms.items():
            if not any(not math.isnan(v) for r in runs for v in r.train["zero_var_frac"]):
                continue  # SFT: no groups
            r = runs[0]
            ax.plot(r.steps, r.train["zero_var_frac"], color=_color(arm), lw=1.0, label=f"{labels.get(arm, arm)} zv")
            ax2.plot(r.steps, r.train["rho"], color=_color(arm), lw=1.0, ls="--")
        ax.set_xlabel("step")
        ax.set_ylabel("zero-variance fraction (solid)")
        ax2.set_ylabel("rho_t (dashed)")
        ax.set_ylim(-0.03, 1.03)
        ax2.set_ylim(-0.03, 1.03)
        ax.set_title(f"{dom}: zero-variance groups and rho (seed {arms[next(iter(arms))][0].seed})")
        ax.legend(fontsize=8, loc="center right")
        save(fig, f"{dom}_zero_var_rho.png")

        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for arm, runs in arms.items():
            r = runs[0]
            steps = [e.step for e in r.evals]
            ax.plot(steps, [e.leak for e in r.evals], color=_color(arm), label=f"{labels.get(arm, arm)} leak")
            ax.plot(steps, [e.no_stop_general for e in r.evals], color=_color(arm), ls=":", lw=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel("fraction of general answers")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{dom}: leak of domain characters (solid), no EOS (dotted)")
        ax.legend(fontsize=8)
        save(fig, f"{dom}_leak.png")

        fig, ax = plt.subplots(figsize=(5.6, 5.0))
        ax.scatter([0.0], [base_general], marker="*", s=160, color="k", zorder=5, label="base")
        for arm, runs in arms.items():
            for i, r in enumerate(runs):
                xs = [e.domain_acc for e in r.evals]
                ys = [e.general_acc for e in r.evals]
                ax.plot(xs, ys, marker=".", color=_color(arm), lw=1.0, alpha=1.0 if i == 0 else 0.4,
                        label=labels.get(arm, arm) if i == 0 else None)
                ax.scatter(xs[-1:], ys[-1:], marker="s", color=_color(arm), zorder=4)
        ax.axvline(TAU, ls="--", color="k", lw=0.8)
        ax.set_xlabel("held-out domain accuracy")
        ax.set_ylabel("mean general accuracy")
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{dom}: frontier (square = last eval)")
        ax.legend(fontsize=8, loc="lower left")
        save(fig, f"{dom}_frontier.png")

    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    doms = list(results)
    arm_names = sorted({a for arms in results.values() for a in arms}, key=lambda a: list(_COLORS).index(a)
                       if a in _COLORS else 99)
    width = 0.8 / max(1, len(arm_names))
    handles = []
    for j, arm in enumerate(arm_names):
        xs, ys, errs = [], [], [[], []]
        for i, dom in enumerate(doms):
            runs = results[dom].get(arm, [])
            vals = [r.reach(TAU).general_acc for r in runs if r.reach(TAU) is not None]
            x = i + (j - (len(arm_names) - 1) / 2) * width
            if not vals:
                if runs:  # the arm ran but never reached tau: say so where its bar would be
                    ax.text(x, 0.02, "never", rotation=90, ha="center", va="bottom", fontsize=7, color=_color(arm))
                continue
            y = sum(vals) / len(vals)
            lo = hi = 0.0
            c4 = verdicts[dom]["criteria"]["C4"]
            boot = c4.get("bootstrap")
            if arm == "rcpa" and boot:  # CI of R_RCPA - R_SFT*, drawn around R_RCPA
                lo, hi = boot["diff"] - boot["lo"], boot["hi"] - boot["diff"]
            xs.append(x)
            ys.append(y)
            ax.text(x, y + 0.01, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
            errs[0].append(max(lo, 0.0))
            errs[1].append(max(hi, 0.0))
        if xs:
            ax.bar(xs, ys, width=width, color=_color(arm), yerr=errs, capsize=3)
        handles.append(Patch(color=_color(arm) or "tab:green", label=labels.get(arm, arm)))
    handles.append(ax.axhline(base_general, ls="--", color="k", lw=0.8, label="base"))
    ax.set_xticks(range(len(doms)))
    ax.set_xticklabels(doms)
    ax.set_ylabel(f"R(tau={TAU}): general accuracy at first domain acc >= tau")
    ax.set_ylim(0, 1.05)
    ax.set_title("R(tau) per arm ('never': did not reach tau); on RCPA's bar the 95% CI of R_RCPA - R_SFT*")
    ax.title.set_fontsize(9)
    ax.legend(handles=handles, fontsize=8)
    save(fig, "r_tau.png")
    return written
