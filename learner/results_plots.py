"""The comparison report's figures, per task: held-out curves with steps-to-target bars, and training-batch curves.
Drawing only: the numbers come from ``learner.results`` (records) and ``learner.curve_stats``."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from common import metrics as M
from learner.curve_stats import bootstrap_ci, mean_curve

# training-batch curves (metrics.jsonl key, panel title)
CURVES = ((M.REWARD_TOTAL, "reward (turn + outcome)"), (M.ANSWER_IN_RESULT, "answer in search result"),
          (M.EXACT_MATCH, "exact match"))
BAND_RESAMPLES = 2000  # bootstrap resamples per plotted point (the report's intervals use curve_stats' default)


def palette(names: list[str]) -> dict[str, Any]:
    """A distinct colour per name (the same estimator keeps its colour in every task's figures): matplotlib's
    ten default colours, then ``tab20b``'s 20 (darkest shade of each of its 5 hues first): 30 distinct colours."""
    import matplotlib

    extra = matplotlib.colormaps["tab20b"]
    return {n: f"C{i}" if i < 10 else extra(((i - 10) % 5) * 4 + ((i - 10) // 5) % 4) for i, n in enumerate(names)}


def plot_held_out(panels: list[tuple[str, dict[str, list[list[tuple[int, float]]]]]],
                  reached: dict[str, list[int | None]], budget: int, target_label: str, title: str,
                  out_path: Path, colours: dict[str, str] | None = None) -> Path | None:
    """One PNG: a panel per ``(title, {estimator: [one held-out curve per seed]})`` (mean over seeds at the steps
    every seed evaluated, band: 95 % bootstrap interval of the mean), then the steps to the target per estimator
    (``reached``: per seed, None = not within ``budget``): a dot per seed that reached it, an x per seed that
    did not (drawn at the budget), a bar at the median (never counted as the budget; hatched when most never)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(curves for _, by_est in panels for curves in by_est.values()):
        return None
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.2 * (len(panels) + 1), 3.6))
    for ax, (name, by_est) in zip(axes, panels):
        for est, curves in by_est.items():
            curves = [dict(c) for c in curves if c]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            stats = [bootstrap_ci([c[s] for c in curves], resamples=BAND_RESAMPLES) for s in steps]
            (line,) = ax.plot(steps, [m for m, _, _ in stats], lw=1.8, marker=".", label=f"{est} (n={len(curves)})",
                              color=(colours or {}).get(est))
            ax.fill_between(steps, [lo for _, lo, _ in stats], [hi for _, _, hi in stats], color=line.get_color(),
                            alpha=0.15, lw=0)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    ax = axes[-1]
    names = [e for e in reached if reached[e]]
    for i, est in enumerate(names):
        seeds = reached[est]
        never = sum(s is None for s in seeds)
        colour = (colours or {}).get(est)
        ax.barh(i, statistics.median([budget if s is None else s for s in seeds]), color=colour, alpha=0.45,
                hatch="//" if never > len(seeds) / 2 else None, edgecolor="grey")
        hit = [s for s in seeds if s is not None]
        ax.scatter(hit, [i] * len(hit), s=14, color="black", zorder=3)
        if never:
            ax.scatter([budget] * never, [i + 0.12 * (k - (never - 1) / 2) for k in range(never)], marker="x",
                       s=22, color="red", zorder=3)
    ax.set_yticks(range(len(names)), labels=names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, budget * 1.08)
    ax.set_xlabel(f"steps to {target_label}")
    ax.set_title("steps to target (dots: seeds; x: never)", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    fig.suptitle(title, fontsize=10)
    rows = -(-len(labels) // 6)  # the legend below the panels, six estimators a row
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07 * rows, 1, 1))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def plot_task(records: list[dict[str, Any]], task: str, estimators: list[str], out_path: Path,
              window: int, colours: dict[str, str] | None = None) -> Path | None:
    """One PNG per task: each curve of :data:`CURVES` vs step, a line per estimator (mean over seeds,
    band ± 1 std); ``colours`` keeps an estimator's colour the same across tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in records if r["task"] == task and any(r["curves"][k] for k, _ in CURVES)]
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
    for ax, (key, title) in zip(axes, CURVES):
        for est in estimators:
            steps, mean, std = mean_curve([r["curves"][key] for r in runs if r["estimator"] == est and
                                           r["curves"][key]], window)
            if not steps:
                continue
            n = sum(1 for r in runs if r["estimator"] == est)
            (line,) = ax.plot(steps, mean, lw=1.8, label=f"{est} (n={n})", color=(colours or {}).get(est))
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.18, lw=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{task}: training batches, mean over seeds ± 1 std (moving average {window})", fontsize=10)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
