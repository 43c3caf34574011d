"""The committed ``docs/results/runs.csv`` reproduces the committed ``docs/results.md``: every paired verdict of
the held-out section, recomputed from the CSV alone with the report's own statistics (``learner.curve_stats``)."""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path

import pytest

from learner.curve_stats import curve_area, paired_difference

REPO = Path(__file__).resolve().parents[2]
CSV, REPORT = REPO / "docs/results/runs.csv", REPO / "docs/results.md"
PAIR = re.compile(r"^- (\w+) - (\w+), (area under answer_in_result|final exact match|final greedy exact match): "
                  r"([+-]\d\.\d{3}) \[([+-]\d\.\d{3}), ([+-]\d\.\d{3})\] over seeds (\[[\d, ]+\]): (.+)$")


def _figures() -> dict[tuple[str, str], dict[str, dict[int, float]]]:
    """(task, estimator) -> figure name -> seed -> value, from runs.csv only."""
    sampled: dict[tuple, dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    greedy: dict[tuple, dict[str, float]] = defaultdict(dict)
    with CSV.open() as f:
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
        curve = [(s, p["answer_in_result"]) for s, p in sorted(points.items())]
        if curve[0][0] > 0:  # starts from the seed's warm-start run, as in the report
            curve.insert(0, (0, sampled[(task, "warm_start", seed)][0]["answer_in_result"]))
        fig = out[(task, est)]
        fig["area under answer_in_result"][seed] = curve_area(curve)
        fig["final exact match"][seed] = points[max(points)]["exact_match"]
        if "exact_match" in greedy.get((task, est, seed), {}):
            fig["final greedy exact match"][seed] = greedy[(task, est, seed)]["exact_match"]
    return out


@pytest.mark.skipif(not CSV.is_file() or not REPORT.is_file(), reason="no committed comparison")
def test_every_paired_verdict_in_the_report_is_recomputed_from_runs_csv():
    figures = _figures()
    section = REPORT.read_text().split("## Held-out learning", 1)[1].split("\n## ", 1)[0]
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
    assert checked >= 40  # both tasks, three figures per pair
