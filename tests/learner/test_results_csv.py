"""The committed ``runs.csv`` files reproduce the committed reports (``docs/results.md`` and the budget grids'):
every paired verdict of the held-out section, recomputed from the CSV alone with the report's own statistics
(``learner.curve_stats``)."""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path

import pytest

from learner.curve_stats import curve_area, paired_difference

REPO = Path(__file__).resolve().parents[2]
REPORTS = [("docs/results/runs.csv", "docs/results.md", 60), ("docs/results/budget80/runs.csv", "docs/results_budget80.md", 12),
           ("docs/results/budget160/runs.csv", "docs/results_budget160.md", 4)]  # csv, report, pair lines at least
PAIR = re.compile(r"^- (\w+) - (\w+), (area under answer_in_result|area under exact_match|final exact match|"
                  r"final greedy exact match): "
                  r"([+-]\d\.\d{3}) \[([+-]\d\.\d{3}), ([+-]\d\.\d{3})\] over seeds (\[[\d, ]+\]): (.+)$")


def _figures(csv_path: Path) -> dict[tuple[str, str], dict[str, dict[int, float]]]:
    """(task, estimator) -> figure name -> seed -> value, from runs.csv only."""
    sampled: dict[tuple, dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    greedy: dict[tuple, dict[str, float]] = defaultdict(dict)
    with csv_path.open() as f:
        for row in csv.DictReader(f):
            key = (row["task"], row["estimator"], int(row["seed"]))
            if row["decoding"] == "sampled":
                sampled[key][int(row["step"])][row["metric"]] = float(row["value"])
            else:
                greedy[key][row["metric"]] = float(row["value"])
    out: dict[tuple[str, str], dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for (task, est, seed), points in sampled.items():
        if est == "warm_start":
            continue
        fig = out[(task, est)]
        for metric in ("answer_in_result", "exact_match"):
            curve = [(s, p[metric]) for s, p in sorted(points.items())]
            if curve[0][0] > 0:  # starts from the seed's warm-start run, as in the report
                curve.insert(0, (0, sampled[(task, "warm_start", seed)][0][metric]))
            fig[f"area under {metric}"][seed] = curve_area(curve)
        fig["final exact match"][seed] = points[max(points)]["exact_match"]
        if "exact_match" in greedy.get((task, est, seed), {}):
            fig["final greedy exact match"][seed] = greedy[(task, est, seed)]["exact_match"]
    return out


@pytest.mark.parametrize("csv_name, report_name, pairs", REPORTS)
def test_every_paired_verdict_in_the_report_is_recomputed_from_runs_csv(csv_name, report_name, pairs):
    csv_path, report = REPO / csv_name, REPO / report_name
    if not csv_path.is_file() or not report.is_file():
        pytest.skip(f"no committed {report_name}")
    figures = _figures(csv_path)
    section = report.read_text().split("## Held-out learning", 1)[1].split("\n## ", 1)[0]
    task, checked = None, 0
    for line in section.splitlines():
        if line.startswith("### "):
            task = line[4:].strip()
        m = PAIR.match(line)
        if not m:
            continue
        a, b, label, mean, low, high, seeds, verdict = m.groups()
        d = paired_difference(figures[(task, a)][label], figures[(task, b)][label])
        assert (f"{d['mean']:+.3f}", f"{d['low']:+.3f}", f"{d['high']:+.3f}", str(d["seeds"])) == \
            (mean, low, high, seeds), line
        want = {"a better": f"{a} higher", "b better": f"{b} higher"}.get(d["verdict"], d["verdict"])
        assert verdict == want, line
        checked += 1
    assert checked >= pairs  # four figures per pair
