"""``verdict.json``, ``summary.json`` and ``REPORT.md`` of a reproduction, written from the analysed results."""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional

from megatron_rcpa.repro.analysis import TAU, ArmResult, mean_finite

__all__ = ["arm_summary", "write_report"]


def _f(x: Optional[float], fmt: str = ".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def arm_summary(runs: List[ArmResult], base_general: float) -> dict:
    """One arm's headline numbers (means over seeds)."""
    reach = [r.reach(TAU) for r in runs]
    ok = [p for p in reach if p is not None]
    fin = [r.final for r in runs]
    m = lambda xs: mean_finite([x for x in xs if x is not None])  # noqa: E731
    return {
        "seeds": [r.seed for r in runs],
        "reached_tau": [p is not None for p in reach],
        "step_at_tau": [p.step if p else None for p in reach],
        "R_tau": m([p.general_acc for p in ok]) if ok else None,
        "leak_at_tau": m([p.leak for p in ok]) if ok else None,
        "kl_general_at_tau": m([p.kl_general for p in ok]) if ok else None,
        "kl_domain_at_tau": m([p.kl_domain for p in ok]) if ok else None,
        "final_domain_acc": m([e.domain_acc for e in fin]),
        "final_general_acc": m([e.general_acc for e in fin]),
        "final_forgetting": base_general - m([e.general_acc for e in fin]),
        "final_per_task": {t: m([e.per_task.get(t) for e in fin]) for t in fin[0].per_task},
        "final_leak": m([e.leak for e in fin]),
        "final_no_stop_general": m([e.no_stop_general for e in fin]),
        "final_no_stop_domain": m([e.no_stop_domain for e in fin]),
        "steps_with_reward": m([r.extra.get("steps_with_reward") for r in runs]),
        "final_sign_off_rate": m([e.sign_off_rate for e in fin]) if fin[0].sign_off_rate is not None else None,
        "final_kl_domain": m([e.kl_domain for e in fin]),
        "final_kl_general": m([e.kl_general for e in fin]),
        "zero_var_frac_mean": m([mean_finite(r.train["zero_var_frac"]) for r in runs]),
        "reward_mean": m([mean_finite(r.train["reward"]) for r in runs]),
        "final_rho": m([r.train["rho"][-1] if r.train["rho"] else None for r in runs]),
        "final_familiarity": m([r.train["familiarity"][-1] if r.train["familiarity"] else None for r in runs]),
        "mean_k_over_l": m([mean_finite(r.train["mean_k_over_l"]) for r in runs]),
        "probe_reward_mean": m([mean_finite(r.train["reward_probe"]) for r in runs]),
        "gen_tokens": m([r.gen_tokens for r in runs]),
        "seq_tokens": m([r.seq_tokens for r in runs]),
        "wall_s": m([r.wall_s for r in runs]),
    }


def _curves(runs: List[ArmResult]) -> list:
    keys = ("step", "domain_acc", "general_acc", "per_task", "leak", "sign_off_rate", "kl_domain", "kl_general",
            "no_stop_general", "no_stop_domain")
    return [{"seed": r.seed, "evals": [{k: getattr(e, k) for k in keys} for e in r.evals],
             "train": {"step": r.steps, **{k: [None if math.isnan(v) else v for v in vs]
                                           for k, vs in r.train.items()}}} for r in runs]


def write_report(report_dir: str, *, preset: dict, base: dict, results: Dict[str, Dict[str, List[ArmResult]]],
                 verdicts: Dict[str, dict], labels: Dict[str, str], total_wall_s: float, command: str,
                 notes: List[str], interpretation: Optional[str] = None,
                 report_command: Optional[str] = None) -> Dict[str, str]:
    os.makedirs(report_dir, exist_ok=True)
    base_general = base["general_accuracy"]
    summaries = {d: {a: arm_summary(runs, base_general) for a, runs in arms.items()} for d, arms in results.items()}
    verdict = {"tau": TAU, "domains": {d: {"outcome": v["outcome"], "why": v["why"], "criteria": v["criteria"]}
                                       for d, v in verdicts.items()},
               "base": base, "preset": preset, "total_wall_s": total_wall_s, "command": command,
               "report_command": report_command}
    paths = {"verdict": os.path.join(report_dir, "verdict.json"), "summary": os.path.join(report_dir, "summary.json"),
             "report": os.path.join(report_dir, "REPORT.md")}
    with open(paths["verdict"], "w") as f:
        json.dump(verdict, f, indent=2, default=float)
    with open(paths["summary"], "w") as f:
        json.dump({"arms": summaries, "curves": {d: {a: _curves(runs) for a, runs in arms.items()}
                                                 for d, arms in results.items()}}, f, default=float)

    L: List[str] = []
    L.append("# RCPA toy reproduction: report")
    L.append("")
    again = f"; this report was written again from the finished runs by `{report_command}`" if report_command else ""
    L.append(f"Runs by `{command}`{again} (megatron_rcpa/repro; numbers and verdict computed by code from the runs).")
    L.append("")
    L.append("## Verdict")
    L.append("")
    for d, v in verdicts.items():
        L.append(f"- **{d}: {v['outcome']}** — {v['why']}.")
    L.append("")
    L.append("| domain | C1 GRPO collapses | C2 RCPA learns | C3 SFT forgets | C4 RCPA retains more | "
             "C5 curriculum matters |")
    L.append("|---|---|---|---|---|---|")
    for d, v in verdicts.items():
        c = v["criteria"]
        def cell(k: str, c=c) -> str:
            return {True: "pass", False: "fail", None: "n/a"}[c[k]["pass"]]
        c1, c3, c4, c5 = c["C1"], c["C3"], c["C4"], c["C5"]
        boot = c4.get("bootstrap")
        ci = f" CI [{_f(boot['lo'])}, {_f(boot['hi'])}]" if boot else ""
        L.append(f"| {d} | {cell('C1')}: zv {_f(c1['grpo_zero_var_frac'])}, final acc "
                 f"{_f(c1['grpo_final_domain_acc_max'])} | {cell('C2')}: {c['C2']['seeds_reaching_tau']}/"
                 f"{c['C2']['seeds']} seeds | {cell('C3')}: R_SFT {_f(c3['R_sft'])} vs base "
                 f"{_f(c3['base_general'])} | {cell('C4')}: diff {_f(c4['diff'])}{ci} | {cell('C5')}: steps "
                 f"{_f(c5.get('steps_rcpa'), '.0f')} vs {_f(c5.get('steps_fixed'), '.0f')}, "
                 f"R {_f(c5.get('R_rcpa'))} vs "
                 f"{_f(c5.get('R_fixed'))} |")
    L.append("")
    L.append(f"Rules (issue 16): C1 GRPO zero-variance fraction >= 0.95 over the run and final domain accuracy "
             f"<= 0.05; C2 RCPA reaches tau = {TAU} in every seed; C3 R_SFT(tau) <= base - 0.2; C4 R_RCPA(tau) - "
             "R_SFT*(tau) >= 0.10 with a bootstrap 95% CI above 0 (SFT* = best SFT learning rate; one seed: the "
             "CI resamples the held-out general samples, paired); C5 vs fixed rho >= 20% fewer steps to tau or "
             "R(tau) >= 0.05 higher. Reproduced = C1-C4; partly = C1-C3 only; refuted = SFT*'s R(tau) higher by "
             ">= 0.1; invalid toy = C1 or C3 fails; the case the rules leave open (C1 and C3 hold, RCPA never "
             "reaches tau, so it has no R(tau) to compare) is called not reproduced. R(tau) = general accuracy at "
             "the first evaluation with domain "
             "accuracy >= tau. See `megatron_rcpa/repro/verdict.py` for the exact order the rules are applied in.")
    L.append("")
    L.append("## Base model")
    L.append("")
    L.append(f"A tiny Llama-style model (hidden {preset['hidden_size']}, {preset['num_layers']} layers, character "
             f"tokenizer) pretrained from scratch by `rcpa-train run.mode=sft` on the general mix for {base['steps']}"
             f" steps ({_f(base['wall_s'], '.0f')} s): greedy general accuracy **{_f(base_general)}** (target "
             f"{base['target']}; {'reached' if base['reached'] else 'NOT reached'}); per task "
             + ", ".join(f"{t} {_f(v)}" for t, v in sorted(base["per_task"].items())) + ".")
    L.append("")
    for d, g in base.get("domain_diagnostics", {}).items():
        L.append(f"- Domain {d} under the base (teacher-forced held-out references): mean log-prob per reference "
                 f"token {g['mean_token_logprob']:.2f}, mean probability of the whole reference "
                 f"{g['mean_sequence_prob']:.2e}, mean probability of EOS right after the full answer "
                 f"{g['mean_eos_prob_after_answer']:.2e}.")
    L.append("")
    for d, arms in summaries.items():
        L.append(f"## Domain {d}")
        L.append("")
        L.append("| arm | reached tau (step) | R(tau) | leak@tau | KL gen@tau | final domain | final general | "
                 "forgetting | leak | sign-off | KL dom / gen (final) | zv mean | reward / probe mean | final fam | "
                 "final rho | mean k/L | gen tokens | seq tokens | wall s |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for a, s in arms.items():
            steps = ",".join("—" if x is None else str(x) for x in s["step_at_tau"])
            L.append(f"| {labels.get(a, a)} | {sum(s['reached_tau'])}/{len(s['seeds'])} ({steps}) | {_f(s['R_tau'])} "
                     f"| {_f(s['leak_at_tau'])} | {_f(s['kl_general_at_tau'])} | {_f(s['final_domain_acc'])} | "
                     f"{_f(s['final_general_acc'])} | {_f(s['final_forgetting'])} | {_f(s['final_leak'])} | "
                     f"{_f(s['final_sign_off_rate'])} | {_f(s['final_kl_domain'])} / {_f(s['final_kl_general'])} | "
                     f"{_f(s['zero_var_frac_mean'])} | {_f(s['reward_mean'])} / {_f(s['probe_reward_mean'])} | "
                     f"{_f(s['final_familiarity'])} | {_f(s['final_rho'])} | {_f(s['mean_k_over_l'], '.2f')} | "
                     f"{_f(s['gen_tokens'], '.0f')} | "
                     f"{_f(s['seq_tokens'], '.0f')} | {_f(s['wall_s'], '.0f')} |")
        L.append("")
        L.append("Final per-task general accuracy: " + "; ".join(
            f"{labels.get(a, a)}: " + ", ".join(f"{t} {_f(v)}" for t, v in s["final_per_task"].items())
            for a, s in arms.items()) + ".")
        L.append("")
        L.append("Diagnostics: steps with any rewarded rollout / answers that never stopped (ran to the generation "
                 "limit without EOS) at the last evaluation, general / domain: " + "; ".join(
                     f"{labels.get(a, a)}: {_f(s['steps_with_reward'], '.0f')} steps, "
                     f"{_f(s['final_no_stop_general'])} / {_f(s['final_no_stop_domain'])}"
                     for a, s in arms.items()) + ".")
        L.append("")
        L.append(f"![domain accuracy](plots/{d}_domain_acc.png) ![general accuracy](plots/{d}_general_acc.png)")
        L.append(f"![zero variance and rho](plots/{d}_zero_var_rho.png) ![frontier](plots/{d}_frontier.png)")
        L.append(f"![leak](plots/{d}_leak.png)")
        L.append("")
    L.append("![R(tau)](plots/r_tau.png)")
    L.append("")
    L.append("## Setup")
    L.append("")
    L.append(f"Preset `{preset['name']}`: arms {', '.join(labels.get(a, a) for a in preset['arm_names'])}; seeds "
             f"{preset['seeds']}; {preset['steps']} steps x {preset['prompts_per_step']} prompts, G = "
             f"{preset['group_size']} rollouts per prompt for the RL arms (SFT: one reference row per prompt), Adam lr "
             f"{preset['lr']} constant, temperature 1, at most {preset['max_new_tokens']} new tokens; greedy "
             f"validation every {preset['val_interval']} steps on {preset['val_per_source']} held-out domain prompts "
             f"and {preset['val_per_source']} per general task. Total wall time {total_wall_s:.0f} s.")
    L.append("")
    L.append("Metrics: `leak` = fraction of general answers holding a character the base never saw (the domain's "
             "alphabet / sign-off); `sign-off` = fraction of domain answers ending with D2's sign-off; `KL` = mean "
             "token KL(policy || base) on the held-out references (teacher-forced), from the checkpoint saved at "
             "each validation; `zv` = fraction of zero-variance groups per step (RL arms); tokens = generated "
             "(`gen_tokens`) and whole-sequence (`seq_tokens`) tokens over the run.")
    L.append("")
    if interpretation:
        L.append("## Interpretation (written after the run, by hand)")
        L.append("")
        L.append(interpretation.strip())
        L.append("")
    if notes:
        L.append("## Notes")
        L.append("")
        L.extend(f"- {n}" for n in notes)
        L.append("")
    with open(paths["report"], "w") as f:
        f.write("\n".join(L))
    return paths
