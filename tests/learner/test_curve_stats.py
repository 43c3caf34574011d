"""learner/curve_stats.py: hand-worked curves and the properties of the bootstrap and the paired verdict."""

from __future__ import annotations

import pytest

from learner.curve_stats import bootstrap_ci, curve_area, paired_difference, steps_to_target


def test_steps_to_target_is_the_first_evaluated_step_at_or_above_it():
    curve = [(0, 0.2), (10, 0.5), (20, 0.8), (30, 0.79), (40, 0.9)]
    assert steps_to_target(curve, 0.8) == 20
    assert steps_to_target(curve, 0.2) == 0
    assert steps_to_target(curve, 0.95) is None


def test_curve_area_by_hand():
    # trapezoids: 10*(0.2+0.6)/2 + 30*(0.6+1.0)/2 = 4 + 24 = 28 over a span of 40 -> 0.7
    assert curve_area([(0, 0.2), (10, 0.6), (40, 1.0)]) == pytest.approx(0.7)
    assert curve_area([(5, 0.3)]) == 0.3
    assert curve_area([(10, 0.6), (0, 0.2)]) == pytest.approx(0.4)  # order does not matter
    # quicker is larger: the same end point reached earlier
    assert curve_area([(0, 0.0), (10, 1.0), (40, 1.0)]) > curve_area([(0, 0.0), (30, 1.0), (40, 1.0)])
    with pytest.raises(ValueError):
        curve_area([])


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_data():
    mean, lo, hi = bootstrap_ci([0.1, 0.2, 0.3, 0.4, 0.5], seed=1)
    assert mean == pytest.approx(0.3) and lo < mean < hi and 0.1 <= lo and hi <= 0.5
    wide = bootstrap_ci([0.0, 1.0] * 3, seed=2)
    narrow = bootstrap_ci([0.0, 1.0] * 50, seed=2)
    assert (narrow[2] - narrow[1]) < (wide[2] - wide[1])
    assert bootstrap_ci([0.7]) == (0.7, 0.7, 0.7)
    assert bootstrap_ci([0.1, 0.9], seed=3) == bootstrap_ci([0.1, 0.9], seed=3)  # deterministic in the seed


def test_paired_difference_verdicts():
    a = {0: 0.30, 1: 0.32, 2: 0.31, 3: 0.29, 4: 0.33}
    b = {0: 0.20, 1: 0.21, 2: 0.19, 3: 0.22, 4: 0.20, 9: 0.99}  # seed 9 has no partner: left out
    out = paired_difference(a, b)
    assert out["seeds"] == [0, 1, 2, 3, 4] and out["mean"] == pytest.approx(0.106)
    assert out["low"] > 0 and out["verdict"] == "a better"
    assert paired_difference(b, a)["verdict"] == "b better"
    # steps to target: fewer is better
    assert paired_difference({0: 10, 1: 12, 2: 11}, {0: 30, 1: 28, 2: 33}, higher_is_better=False)["verdict"] == "a better"
    noisy = paired_difference({0: 0.3, 1: 0.1, 2: 0.25}, {0: 0.1, 1: 0.3, 2: 0.2})
    assert noisy["low"] < 0 < noisy["high"] and noisy["verdict"] == "not distinguishable"
    with pytest.raises(ValueError, match="paired"):
        paired_difference({0: 1.0}, {1: 1.0})


def test_the_report_palette_gives_every_estimator_its_own_colour():
    from learner.results_plots import palette

    names = [f"e{i}" for i in range(30)]
    colours = palette(names)
    assert len({str(c) for c in colours.values()}) == len(names)
