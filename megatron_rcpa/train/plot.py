"""``rcpa-plot RUN_DIR``: PNG curves of a run (reward, rho, familiarity, zero_var_frac, entropy, KL) from
``RUN_DIR/metrics.jsonl``, written to ``RUN_DIR/plots/`` (or ``--out``)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional

from megatron_rcpa.train.metrics_log import read_metrics

PANELS = [
    ("reward", ["reward", "reward_probe", "reward_constrained"]),
    ("rho", ["rho", "mean_k_over_l", "lambda_t"]),
    ("familiarity", ["familiarity"]),
    ("zero_var_frac", ["zero_var_frac"]),
    ("entropy", ["entropy"]),
    ("kl", ["kl_ref", "approx_kl_old"]),
]


def plot_run(run_dir: str, out_dir: Optional[str] = None) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl holds no steps")
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    steps = [r["step"] for r in records]
    written = []
    for name, keys in PANELS:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        drawn = 0
        for key in keys:
            ys = [r.get(key, float("nan")) for r in records]
            if all(not isinstance(y, (int, float)) or math.isnan(y) for y in ys):
                continue
            ax.plot(steps, ys, label=key, marker="." if len(steps) < 30 else None)
            drawn += 1
        switch = next((r["step"] for r in records if r.get("phase_name") == "reinforcement_alignment"), None)
        if switch is not None:
            ax.axvline(switch, color="gray", linestyle="--", label="reinforcement alignment")
        ax.set_xlabel("step")
        ax.set_title(name)
        if drawn == 0:
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="rcpa-plot", description=__doc__)
    p.add_argument("run_dir", help="an rcpa-train output_dir (holds metrics.jsonl)")
    p.add_argument("--out", help="where to write the PNGs (default RUN_DIR/plots)")
    args = p.parse_args(argv)
    try:
        for path in plot_run(args.run_dir, args.out):
            print(path)
    except (FileNotFoundError, ValueError) as e:
        print(f"rcpa-plot: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
