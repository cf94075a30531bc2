"""Expected best score after n trials (Tang et al. 2020 without replacement, Dodge et al. 2019 with it),
checked against brute force over every n-subset / n-tuple of fabricated trial values, and by hand."""

from __future__ import annotations

import itertools
import statistics

import numpy as np
import pytest

from unetlab.analysis.expected_max import (
    Crossing,
    crossings,
    expected_max,
    expected_max_curve,
    leader_by_budget,
)

TRIALS = {
    "distinct": [0.61, 0.72, 0.55, 0.80, 0.67, 0.74, 0.59],
    "ties": [0.70, 0.70, 0.65, 0.80, 0.65, 0.70, 0.80, 0.50],
    "all_equal": [0.4, 0.4, 0.4],
    "ten": list(np.random.default_rng(3).normal(0.7, 0.05, size=10).round(3)),
    "single": [0.9],
}


def brute_without(values, n, best):
    return statistics.mean(best(c) for c in itertools.combinations(values, n))


def brute_with(values, n, best):
    return statistics.mean(best(t) for t in itertools.product(values, repeat=n))


@pytest.mark.parametrize("name", TRIALS)
@pytest.mark.parametrize("direction,best", [("max", max), ("min", min)])
def test_without_replacement_is_the_mean_best_over_all_subsets(name, direction, best):
    values = TRIALS[name]
    for n in range(1, len(values) + 1):
        assert expected_max(values, n, direction=direction) == pytest.approx(
            brute_without(values, n, best), abs=1e-12), (name, n)


@pytest.mark.parametrize("name", ["distinct", "ties", "all_equal", "single"])
@pytest.mark.parametrize("direction,best", [("max", max), ("min", min)])
def test_with_replacement_is_the_mean_best_over_all_tuples(name, direction, best):
    values = TRIALS[name]
    for n in range(1, min(len(values), 5) + 1):  # N^n tuples: up to 8^5
        got = expected_max(values, n, direction=direction, estimator="with_replacement")
        assert got == pytest.approx(brute_with(values, n, best), abs=1e-12), (name, n)


def test_hand_computation():
    # values 1, 2, 3, 4; n = 2. Subsets: {1,2}->2 {1,3}->3 {1,4}->4 {2,3}->3 {2,4}->4 {3,4}->4: mean 20/6.
    assert expected_max([3, 1, 4, 2], 2) == pytest.approx(20 / 6)
    # With replacement: P(max = k) = (k/4)^2 - ((k-1)/4)^2 = (2k-1)/16: sum k(2k-1)/16 = (1+6+15+28)/16.
    assert expected_max([3, 1, 4, 2], 2, estimator="with_replacement") == pytest.approx(50 / 16)
    # Minimisation, without replacement: the minima are 1 1 1 2 2 3: mean 10/6.
    assert expected_max([3, 1, 4, 2], 2, direction="min") == pytest.approx(10 / 6)


def test_curve_ends_at_the_mean_and_the_best():
    values = TRIALS["ties"]
    curve = expected_max_curve(values)
    assert len(curve) == len(values)
    assert curve[0] == pytest.approx(statistics.mean(values))
    assert curve[-1] == pytest.approx(max(values))
    assert all(a <= b + 1e-15 for a, b in zip(curve, curve[1:]))  # more trials never hurt in expectation
    low = expected_max_curve(values, direction="min")
    assert low[-1] == pytest.approx(min(values)) and all(a >= b - 1e-15 for a, b in zip(low, low[1:]))


def test_large_n_does_not_overflow_and_matches_the_order_statistic_formula():
    rng = np.random.default_rng(0)
    values = rng.uniform(size=3000)
    # For uniform(0, 1) trials the estimator is near the order-statistic mean n / (n + 1).
    for n in (1, 10, 500, 2999, 3000):
        got = expected_max(values, n)
        assert np.isfinite(got) and abs(got - n / (n + 1)) < 0.02, n
    assert expected_max(values, 3000) == pytest.approx(values.max())
    # Exact agreement with Python's big-integer binomials on a mid-sized N (no float overflow there either).
    from math import comb
    small = np.sort(rng.uniform(size=1200))
    exact = sum(v * comb(i, 40 - 1) for i, v in enumerate(small)) / comb(1200, 40)
    assert expected_max(small, 40) == pytest.approx(float(exact), rel=1e-9)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least 5 observed"):
        expected_max([1.0, 2.0], 5)
    with pytest.raises(ValueError, match="finite"):
        expected_max([1.0, float("nan")], 1)
    with pytest.raises(ValueError, match="positive integer"):
        expected_max([1.0], 0)
    with pytest.raises(ValueError, match="direction"):
        expected_max([1.0], 1, direction="up")
    assert expected_max([1.0, 2.0], 5, estimator="with_replacement") == pytest.approx(2 - 1 / 32)


def test_crossing_when_the_leader_changes_with_the_budget():
    # A: steady trials (good mean, low ceiling); B: erratic (poor mean, high ceiling).
    steady = [0.70, 0.71, 0.72, 0.70, 0.71, 0.72]
    erratic = [0.40, 0.50, 0.60, 0.65, 0.75, 0.78]
    curves = {"steady": expected_max_curve(steady), "erratic": expected_max_curve(erratic)}
    leaders = leader_by_budget(curves)
    brute = ["steady" if brute_without(steady, n, max) > brute_without(erratic, n, max) else "erratic"
             for n in range(1, 7)]
    assert leaders == brute
    assert leaders[0] == "steady" and leaders[-1] == "erratic"
    switch = leaders.index("erratic") + 1
    assert crossings(curves) == [Crossing(below=switch - 1, above=switch, before="steady", after="erratic")]
    # Lower is better: the same values read as losses: the erratic variant's low values lead with a budget.
    low = {"steady": expected_max_curve(steady, direction="min"),
           "erratic": expected_max_curve(erratic, direction="min")}
    assert crossings(low, direction="min") == []  # erratic has the lower minimum at every n
    assert set(leader_by_budget(low, direction="min")) == {"erratic"}


def test_no_crossing_through_a_tie():
    curves = {"a": [0.5, 0.6, 0.7], "b": [0.4, 0.6, 0.65]}
    assert leader_by_budget(curves) == ["a", None, "a"]
    assert crossings(curves) == []
