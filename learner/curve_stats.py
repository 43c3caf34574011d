"""Statistics of held-out learning curves, for comparing estimators with evidence ([4/7]).

A *curve* is a list of ``(step, value)`` points of one run's held-out evaluation (``eval.json``'s
``curve``, ``eval.every_steps``), sorted by step. Pure functions; no plotting, no I/O.

- :func:`steps_to_target`: the first evaluated step whose value reaches a target (None if never);
- :func:`curve_area`: the normalised area under the curve (trapezoids over the evaluated steps,
  divided by the step span): the mean level over training, so "quicker" counts, not only the end;
- :func:`bootstrap_ci`: a percentile bootstrap interval of the mean;
- :func:`mean_std`, :func:`smooth`, :func:`mean_curve`: the mean ± std over seeds of (smoothed) curves;
- :func:`paired_difference`: the mean of per-seed differences (same seed = same data order and warm
  start) with its bootstrap interval, and a plain verdict.
"""

from __future__ import annotations

import math
import random
from typing import Iterable, Sequence

Curve = Sequence[tuple[int, float]]


def steps_to_target(curve: Curve, target: float) -> int | None:
    """The first step whose value is ``>= target``; None when the curve never reaches it."""
    for step, value in curve:
        if value >= target:
            return int(step)
    return None


def curve_area(curve: Curve) -> float:
    """``(1 / (s_n - s_0)) * sum_i (s_{i+1} - s_i) * (v_i + v_{i+1}) / 2``: the curve's mean level over its
    step span (trapezoid rule over the evaluated steps). A one-point curve gives that point's value."""
    if not curve:
        raise ValueError("an empty curve has no area")
    pts = sorted((int(s), float(v)) for s, v in curve)
    if len(pts) == 1 or pts[-1][0] == pts[0][0]:
        return pts[0][1]
    area = sum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(pts, pts[1:]))
    return area / (pts[-1][0] - pts[0][0])


def bootstrap_ci(values: Sequence[float], *, level: float = 0.95, resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and its percentile bootstrap interval at ``level`` (deterministic in
    ``seed``). With one value the interval is that value; with few values it is wide, as it should be."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values")
    if not 0 < level < 1:
        raise ValueError(f"level={level}: must be in (0, 1)")
    mean = sum(vals) / len(vals)
    rng = random.Random(seed)
    n = len(vals)
    means = sorted(sum(rng.choice(vals) for _ in range(n)) / n for _ in range(resamples))
    lo_i = int((1 - level) / 2 * (resamples - 1))
    hi_i = int((1 + level) / 2 * (resamples - 1))
    return mean, means[lo_i], means[hi_i]


def paired_difference(a: dict[int, float], b: dict[int, float], *, higher_is_better: bool = True,
                      level: float = 0.95, seed: int = 0) -> dict[str, object]:
    """``a - b`` over the seeds both have: mean, bootstrap interval, seeds used, and a verdict.

    ``a`` and ``b`` map seed -> a run's figure (final EM, area, steps to target, ...). The verdict is
    ``"a better"`` / ``"b better"`` when the interval excludes 0 (in the direction ``higher_is_better``
    says), else ``"not distinguishable"``.
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("no seed in common: the comparison must be paired")
    diffs = [a[s] - b[s] for s in seeds]
    mean, lo, hi = bootstrap_ci(diffs, level=level, seed=seed)
    if lo > 0 or hi < 0:
        a_better = (lo > 0) == higher_is_better
        verdict = "a better" if a_better else "b better"
    else:
        verdict = "not distinguishable"
    return {"mean": mean, "low": lo, "high": hi, "seeds": seeds, "verdict": verdict}


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """``(mean, sample std, n)``; std uses n - 1 and is 0 for one value; ``(nan, nan, 0)`` for none."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return mean, std, n


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (shorter at the start)."""
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1):i + 1]
        out.append(sum(part) / len(part))
    return out


def mean_curve(curves: list[dict[int, float]], window: int = 1) -> tuple[list[int], list[float], list[float]]:
    """Steps logged by every seed, and the mean and sample std over seeds of the smoothed curves."""
    if not curves:
        return [], [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    smoothed = [smooth([c[s] for s in steps], window) for c in curves]
    stats = [mean_std(col) for col in zip(*smoothed)]
    return steps, [m for m, _, _ in stats], [s for _, s, _ in stats]
