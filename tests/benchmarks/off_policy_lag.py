"""Held-out learning at policy lag 3: ``algorithm.off_policy`` none | tis | decoupled, with and without the
staleness-aware step (``learner.lag_lr_scale``), next to synchronous training; same seeds and budget.

    .venv/bin/python tests/benchmarks/off_policy_lag.py --out /tmp/lag      # ~21 runs x 1.5-3 min on 2 cores

Resumable: a run whose ``eval.json`` exists is skipped. Writes ``docs/results/lag3_runs.csv`` (one row per
run x step) and ``docs/results/lag3_curves.png`` (training-batch curves, mean of the seeds), and prints the
held-out table of docs/benchmarks.md ("Lag 3: off-policy correction").
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics as st
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMON = ["learner.total_steps=40", "eval.num_questions=200", "eval.greedy=false", "checkpoint.every_steps=0"]
LAG3 = ["rollout.mode=async", "queue.max_policy_lag=3", "rollout.num_workers=3"]
CONDITIONS = {  # name -> (overrides, legend)
    "sync": ([], "sync (lag 0)"),
    **{op: ([*LAG3, "learner.lag_lr_scale=1.0", f"algorithm.off_policy={op}"], f"lag 3, {op}, lag_lr_scale 1")
       for op in ("none", "tis", "decoupled")},
    **{f"scaled_{op}": ([*LAG3, f"algorithm.off_policy={op}"], f"lag 3, {op}, lag_lr_scale 0.5")
       for op in ("none", "tis", "decoupled")},
}
KEYS = ["rollout/tool_success/rate", "rollout/answer_in_result/rate", "rollout/exact_match/rate",
        "train/logprob_gap/mean", "train/clip_frac", "queue/policy_lag/max"]


def run_all(out: Path, seeds: list[int]) -> None:
    turnrl = REPO / ".venv/bin/turnrl"
    for seed in seeds:
        for name, (overrides, _) in CONDITIONS.items():
            d = out / f"{name}_s{seed}"
            if (d / "eval.json").exists():
                continue
            cmd = [str(turnrl), "train", "--config", "deploy/configs/local.yaml", *COMMON, *overrides,
                   f"run.seed={seed}", f"run.run_dir={d}"]
            print(" ".join(cmd[1:]), flush=True)
            with open(f"{d}.log", "w") as log:
                subprocess.run(cmd, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "DS_ACCELERATOR": "cpu"})


def report(out: Path, seeds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, fig, axes = [], *plt.subplots(1, 2, figsize=(12, 4.2))
    print("| condition | tool success | answer in result | exact match | lowest training-batch tool success |")
    print("|---|---|---|---|---|")
    for name, (_, legend) in CONDITIONS.items():
        runs = [out / f"{name}_s{s}" for s in seeds if (out / f"{name}_s{s}" / "eval.json").exists()]
        if not runs:
            continue
        evals = [json.loads((d / "eval.json").read_text())["trained"] for d in runs]
        metrics = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in runs]
        for d, m in zip(runs, metrics):
            rows += [{"condition": name, "seed": d.name.rsplit("_s", 1)[1], "step": x["step"],
                      **{k: x.get(k) for k in KEYS}} for x in m]
        cell = lambda k: f"{st.mean(e[k] for e in evals):.3f} ± {st.pstdev(e[k] for e in evals):.3f}"  # noqa: E731
        low = ", ".join(f"{min(x['rollout/tool_success/rate'] for x in m):.2f}" for m in metrics)
        print(f"| {legend} | {cell('tool_success')} | {cell('answer_in_result')} | {cell('exact_match')} | {low} |")
        n = min(len(m) for m in metrics)
        for ax, k in zip(axes, KEYS[:2]):
            ax.plot(range(1, n + 1), [st.mean(m[i][k] for m in metrics) for i in range(n)], label=legend,
                    ls="--" if "lag_lr_scale 1" in legend else "-")
    for ax, title in zip(axes, ["training-batch tool success", "training-batch answer in result"]):
        ax.set_xlabel("step")
        ax.set_title(f"{title} (mean of {len(seeds)} seeds)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(REPO / "docs/results/lag3_curves.png", dpi=110)
    with open(REPO / "docs/results/lag3_runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["condition", "seed", "step", *KEYS])
        w.writeheader()
        w.writerows(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/turnrl-lag3"), help="run directories")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--report-only", action="store_true", help="only rewrite the CSV, the plot and the table")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        run_all(args.out, args.seeds)
    report(args.out, args.seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
