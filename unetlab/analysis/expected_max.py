"""Expected best validation score after n tuning trials, estimated from the N trials a study ran.

Two estimators of E[max of n trials] from observed trial values v(1) <= ... <= v(N) (sorted ascending):

- ``without_replacement`` (Tang et al. 2020, "Showing your work doesn't always work"): the unbiased estimator
  of the expected maximum of n values drawn from the trials *without* replacement, defined for n <= N::

      E[max_n] = sum_i v(i) * C(i-1, n-1) / C(N, n)

  (the i-th smallest value is the maximum of exactly C(i-1, n-1) of the C(N, n) subsets of size n).
- ``with_replacement`` (Dodge et al. 2019, "Show your work"): n values drawn i.i.d. from the empirical
  distribution of the trials, defined for every n >= 1::

      E[max_n] = sum_i v(i) * ((i/N)^n - ((i-1)/N)^n)

Ties need no special care: tied values are summed with positional weights whose total over the tie is the
probability that the maximum takes that value. For a lower-is-better metric the expected *minimum* is the
negated expected maximum of the negated values. Weights are computed from log-binomials, so N in the
thousands neither overflows nor loses the small weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln

__all__ = ["Crossing", "crossings", "expected_max", "expected_max_curve", "leader_by_budget"]

ESTIMATORS = ("without_replacement", "with_replacement")


def _oriented(values: Sequence[float], direction: str) -> np.ndarray:
    """The trial values as finite floats, sorted ascending, negated for ``direction == "min"``."""
    if direction not in ("max", "min"):
        raise ValueError(f"direction must be 'max' or 'min', got {direction!r}")
    array = np.asarray(list(values), dtype=float)
    if array.ndim != 1 or array.size == 0:
        raise ValueError("expected max needs at least one trial value")
    if not np.all(np.isfinite(array)):
        raise ValueError("trial values must be finite (drop failed trials before estimating)")
    return np.sort(-array if direction == "min" else array)


def _log_binomial(n: np.ndarray | int, k: np.ndarray | int) -> np.ndarray:
    """log C(n, k) for 0 <= k <= n (elementwise)."""
    return gammaln(np.asarray(n) + 1.0) - gammaln(np.asarray(k) + 1.0) - gammaln(np.asarray(n) - np.asarray(k) + 1.0)


def _weights_without_replacement(total: int, n: int) -> np.ndarray:
    """P(the i-th smallest of ``total`` values is the maximum of a random n-subset), i = 1..total."""
    i = np.arange(1, total + 1)
    weights = np.zeros(total)
    possible = i >= n  # C(i-1, n-1) = 0 below
    weights[possible] = np.exp(_log_binomial(i[possible] - 1, n - 1) - _log_binomial(total, n))
    return weights


def _weights_with_replacement(total: int, n: int) -> np.ndarray:
    """P(the maximum of n i.i.d. draws from the empirical distribution is the i-th smallest), i = 1..total."""
    fractions = np.arange(0, total + 1) / total
    return np.diff(fractions**n)


def expected_max(values: Sequence[float], n: int, *, direction: str = "max",
                 estimator: str = "without_replacement") -> float:
    """Expected best of ``n`` trials (the maximum, or the minimum when ``direction == "min"``).

    ``estimator``: ``"without_replacement"`` (Tang et al. 2020, unbiased, needs ``n <= len(values)``) or
    ``"with_replacement"`` (Dodge et al. 2019, any ``n >= 1``).
    """
    oriented = _oriented(values, direction)
    total = oriented.size
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if estimator == "without_replacement":
        if n > total:
            raise ValueError(f"n = {n} trials without replacement needs at least {n} observed trials, got {total}")
        weights = _weights_without_replacement(total, int(n))
    else:
        weights = _weights_with_replacement(total, int(n))
    best = float(np.dot(weights, oriented))
    return -best if direction == "min" else best


def expected_max_curve(values: Sequence[float], *, direction: str = "max",
                       estimator: str = "without_replacement", n_max: int | None = None) -> list[float]:
    """``expected_max`` for n = 1 .. ``n_max`` (default: the number of observed trials)."""
    n_max = len(values) if n_max is None else n_max
    return [expected_max(values, n, direction=direction, estimator=estimator) for n in range(1, n_max + 1)]


def leader_by_budget(curves: Mapping[str, Sequence[float]], *, direction: str = "max",
                     tolerance: float = 1e-12) -> list[str | None]:
    """For n = 1 .. (the shortest curve's length): the variant whose expected best is better at n trials, or
    None when the best two are within ``tolerance`` of each other (a tie names no leader)."""
    if len(curves) < 2:
        raise ValueError("a leader needs at least two curves")
    length = min(len(c) for c in curves.values())
    sign = 1.0 if direction == "max" else -1.0
    leaders: list[str | None] = []
    for index in range(length):
        ranked = sorted(curves, key=lambda name: sign * curves[name][index], reverse=True)
        first, second = curves[ranked[0]][index], curves[ranked[1]][index]
        leaders.append(None if math.isclose(first, second, rel_tol=0.0, abs_tol=tolerance) else ranked[0])
    return leaders


@dataclass(frozen=True)
class Crossing:
    """The better variant changes between ``below`` trials (led by ``before``) and ``above`` trials (``after``)."""

    below: int
    above: int
    before: str
    after: str


def crossings(curves: Mapping[str, Sequence[float]], *, direction: str = "max",
              tolerance: float = 1e-12) -> list[Crossing]:
    """Where the leading variant changes along the budget n = 1, 2, ... (ties skipped: a leader that ties at
    some n and leads again after is no crossing)."""
    found: list[Crossing] = []
    last: tuple[int, str] | None = None
    for n, leader in enumerate(leader_by_budget(curves, direction=direction, tolerance=tolerance), start=1):
        if leader is None:
            continue
        if last is not None and leader != last[1]:
            found.append(Crossing(below=last[0], above=n, before=last[1], after=leader))
        last = (n, leader)
    return found
