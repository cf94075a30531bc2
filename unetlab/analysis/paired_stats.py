"""Paired statistics for two variants evaluated on the same images and replicates (used by ``unetlab compare``).

A *replicate* is one (fold, seed): both variants trained with that seed on that fold's training
images, both evaluated on that fold's validation images. The input of every function here is the
per-image differences ``A - B`` grouped by replicate: a replicates x images matrix when every
replicate has the same images (seeds without folds, ``diffs[s, i]``), or a list of 1-D arrays, one
per replicate, when they differ (K-fold cross-validation: each fold validates its own images, so with
one seed every image of the training pool is paired exactly once). From it:

- the mean difference over all (replicate, image) pairs and its 95% confidence interval from a
  hierarchical bootstrap: each bootstrap draw resamples the replicates with replacement, then,
  within each drawn replicate, its images with replacement, and takes the mean of all drawn
  differences (both sources of variation count);
- a Wilcoxon signed-rank test across images on the differences averaged over the replicates that
  validate each image (over seeds; with folds an image is in one fold);
- effect sizes: d_z (mean / sd of those image differences) and the matched-pairs rank-biserial r;
- Holm's step-down correction when several pairs are tested;
- a verdict, with a margin an estimate of how many seeds or images would resolve it, and whether it
  is *fragile* (``fragility``): a bound of the interval so close to a threshold it is compared with
  (0, +-margin) that floating-point noise or another machine could flip it.

Bootstrap draws are reproducible and defined exactly (a test redoes them in a plain loop): with R
replicates of n_r images, M = max n_r and ``rng = numpy.random.default_rng(seed)``, bootstrap draw b
takes ``u = rng.random(R + R*M)``; drawn replicate j is ``r_j = floor(u[j] * R)`` and its drawn image k
(k < n_{r_j}) is ``floor(u[R + j*M + k] * n_{r_j})``; the draw's value is the sum of the drawn
differences over their count. With equal sizes (M = I) this is the seeds x images bootstrap of
earlier versions, draw for draw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "BOOTSTRAP_SEED",
    "RESAMPLES",
    "PairedResult",
    "FRAGILE_FRACTION",
    "bootstrap_replicates",
    "cv_estimate",
    "fragile_text",
    "fragility",
    "hierarchical_ci",
    "holm",
    "image_means",
    "needed_sizes",
    "paired_comparison",
    "rank_biserial",
    "t_interval",
    "verdict",
    "wilcoxon_signed_rank",
]

BOOTSTRAP_SEED = 20240607
RESAMPLES = 10_000
LEVEL = 0.95
ALPHA = 0.05
_Z = 1.959963984540054  # standard normal 97.5% quantile
_CHUNK_VALUES = 4_000_000  # uniforms drawn per chunk: bounds memory for large R x M
FRAGILE_FRACTION = 0.1  # a bound within this fraction of the margin (or of the CI half-width) of a threshold


def _groups(diffs: Any) -> list[np.ndarray]:
    """The differences as one finite 1-D float array per replicate (a matrix: one per row)."""
    if isinstance(diffs, np.ndarray) and diffs.ndim == 2:
        groups = [np.asarray(row, dtype=np.float64) for row in diffs]
    elif isinstance(diffs, np.ndarray):
        raise ValueError(f"diffs must be a non-empty replicates x images matrix, got shape {diffs.shape}")
    else:
        groups = [np.asarray(g, dtype=np.float64) for g in diffs]
    if not groups or any(g.ndim != 1 or g.size < 1 for g in groups):
        raise ValueError("diffs must hold at least one replicate, each with at least one image difference")
    if not all(np.isfinite(g).all() for g in groups):
        raise ValueError("diffs contain NaN or inf; drop those images first")
    return groups


def _padded(groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.array([g.size for g in groups], dtype=np.int64)
    padded = np.zeros((len(groups), int(sizes.max())))
    for r, g in enumerate(groups):
        padded[r, :g.size] = g
    return padded, sizes


def bootstrap_replicates(diffs: Any, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """Hierarchical bootstrap draws of the mean difference (replicates, then images within them)."""
    padded, sizes = _padded(_groups(diffs))
    n_rep, width_images = padded.shape
    width = n_rep + n_rep * width_images
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    chunk = max(1, _CHUNK_VALUES // width)
    column = np.arange(width_images)
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        u = rng.random((count, width))  # the same stream as `count` calls of rng.random(width)
        drawn = np.minimum((u[:, :n_rep] * n_rep).astype(np.int64), n_rep - 1)
        n = sizes[drawn][:, :, None]  # images of each drawn replicate
        images = np.minimum((u[:, n_rep:].reshape(count, n_rep, width_images) * n).astype(np.int64), n - 1)
        values = np.where(column < n, padded[drawn[:, :, None], images], 0.0)
        out[start:start + count] = values.sum(axis=(1, 2)) / n.sum(axis=(1, 2))
    return out


def hierarchical_ci(diffs: Any, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                    level: float = LEVEL) -> tuple[float, float, float]:
    """(mean difference over all pairs, lower, upper): percentile interval of the hierarchical bootstrap."""
    groups = _groups(diffs)
    draws = bootstrap_replicates(groups, resamples, seed)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(np.concatenate(groups).mean()), float(low), float(high)


def cv_estimate(groups: Any, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """A cross-validation estimate from per-image values grouped by replicate (fold x seed).

    ``mean``: over all values (with one seed: every image of the pool once, nnU-Net's CV estimate);
    ``std``: of the replicate means (None with one replicate); ``ci_low``/``ci_high``: the 95%
    percentile interval of the same hierarchical bootstrap as the paired differences (replicates,
    then images within them).
    """
    values = _groups(groups)
    mean, low, high = hierarchical_ci(values, resamples, seed)
    means = [float(g.mean()) for g in values]
    return {"mean": mean, "std": float(np.std(means, ddof=1)) if len(means) > 1 else None, "ci_low": low,
            "ci_high": high, "n_replicates": len(values), "n_values": int(sum(g.size for g in values)),
            "interval": "hierarchical bootstrap: replicates, then images"}


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float] | None:
    """The ``level`` t-interval of the mean of ``values`` (None with fewer than 2)."""
    if len(values) < 2:
        return None
    from scipy import stats

    mean, sem = float(np.mean(values)), float(np.std(values, ddof=1) / np.sqrt(len(values)))
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * sem
    return mean - half, mean + half


def wilcoxon_signed_rank(differences: Sequence[float] | np.ndarray) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test (SciPy's defaults); 1.0 when every difference is 0."""
    from scipy import stats

    d = np.asarray(differences, dtype=np.float64)
    if d.size == 0 or not np.any(d != 0):
        return 1.0
    return float(stats.wilcoxon(d).pvalue)


def rank_biserial(differences: Sequence[float] | np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation (R+ - R-) / (R+ + R-) over the non-zero differences."""
    from scipy.stats import rankdata

    d = np.asarray(differences, dtype=np.float64)
    d = d[d != 0]
    if d.size == 0:
        return 0.0
    ranks = rankdata(np.abs(d))
    return float((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-adjusted p-values (step-down, monotone, capped at 1); ``None`` entries stay ``None``."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(indexed)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def needed_sizes(diffs: Any, half_width: float, target: float, folds: int = 1,
                 rule: str = "sizes at which the 95% CI half-width would fall to margin/2, "
                             "from the observed spread") -> dict[str, Any]:
    """How many seeds (images fixed) or images (seeds fixed) would shrink the CI half-width to ``target``.

    The bootstrap's variance behaves as ``B/R + 2W/(R*I)`` (R replicates of I images, I their mean; W:
    variance of the image differences within a replicate; B: what the spread of the replicate means
    leaves after W/I; resampling replicates and then images counts W twice). Replicates: the half-width
    falls as 1/sqrt(R), so ``ceil(R * (half_width / target)^2)`` replicates, i.e. that many over
    ``folds`` seeds (with K folds each seed adds K replicates). Images: that variance model, scaled to
    the observed half-width, solved for I per replicate (times ``folds``: the pool that K-fold
    validation covers); ``None`` when the replicate-to-replicate part alone is already too wide at these
    replicates (more images cannot help).
    """
    groups = _groups(diffs)
    n_rep = len(groups)
    n_images = float(np.mean([g.size for g in groups]))
    replicates = n_rep if half_width <= target else math.ceil(n_rep * (half_width / target) ** 2)
    spreads = [float(g.var(ddof=1)) for g in groups if g.size > 1]
    within = float(np.mean(spreads)) if spreads else 0.0
    means = np.array([g.mean() for g in groups])
    between = max(0.0, float(means.var(ddof=1)) - within / n_images) if n_rep > 1 else 0.0
    images: int | None = round(n_images * folds)
    if half_width > target:
        current = between / n_rep + 2 * within / (n_rep * n_images)
        room = current * (target / half_width) ** 2 - between / n_rep
        images = math.ceil(2 * within / (n_rep * room)) * folds if room > 0 and within > 0 else None
    return {"target_half_width": target, "seeds": math.ceil(replicates / folds), "replicates": replicates,
            "images": images, "rule": rule}


@dataclass
class PairedResult:
    """One pair's paired statistics (A - B)."""

    difference: float
    ci_low: float
    ci_high: float
    n_seeds: int
    n_images: int
    wilcoxon_p: float
    rank_biserial: float
    effect_size_dz: float | None
    needed: dict[str, Any] | None = None
    n_folds: int = 1
    n_replicates: int = 0
    n_pairs: int = 0
    fragile: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready)."""
        return asdict(self)


def image_means(groups: Sequence[np.ndarray], image_ids: Sequence[Sequence[Any]] | None = None) -> np.ndarray:
    """Each distinct image's difference averaged over the replicates that validate it (first-seen order).

    Without ``image_ids`` the k-th value of every replicate is the same image (a seeds x images matrix)."""
    if image_ids is None:
        image_ids = [range(len(g)) for g in groups]
    sums: dict[Any, list[float]] = {}
    for g, ids in zip(groups, image_ids):
        if len(ids) != len(g):
            raise ValueError("image_ids must name every difference of its replicate")
        for image, value in zip(ids, g):
            sums.setdefault(image, []).append(float(value))
    return np.array([math.fsum(v) / len(v) for v in sums.values()])


def paired_comparison(diffs: Any, margin: float | None = None, resamples: int = RESAMPLES,
                      seed: int = BOOTSTRAP_SEED, image_ids: Sequence[Sequence[Any]] | None = None,
                      n_seeds: int | None = None, n_folds: int = 1) -> PairedResult:
    """Everything for one pair from its differences grouped by replicate (see the module docstring).

    ``image_ids``: per replicate, the id of each difference's image (the Wilcoxon test's units);
    ``n_seeds``/``n_folds``: how the replicates are made (default: one fold, one seed per replicate).
    """
    groups = _groups(diffs)
    mean, low, high = hierarchical_ci(groups, resamples, seed)
    per_image = image_means(groups, image_ids)  # the Wilcoxon test pairs images, each averaged over seeds
    sd = float(per_image.std(ddof=1)) if per_image.size > 1 else 0.0
    needed = None
    if margin is not None and margin > 0:
        needed = needed_sizes(groups, (high - low) / 2, margin / 2, n_folds)
    result = PairedResult(mean, low, high, n_seeds if n_seeds is not None else len(groups), int(per_image.size),
                          wilcoxon_signed_rank(per_image), rank_biserial(per_image), mean / sd if sd > 0 else None,
                          needed, n_folds, len(groups), int(sum(g.size for g in groups)))
    result.fragile = fragility(result, margin, groups)
    return result


def fragility(result: PairedResult, margin: float | None, diffs: Any = None,
              fraction: float = FRAGILE_FRACTION) -> dict[str, Any] | None:
    """Whether the verdict hangs on a hair: None, or what is close and what would settle it.

    The verdict compares the interval's bounds with thresholds: 0 (which variant is better) and, with a
    margin, -margin and +margin (equivalence). It is *fragile* when a bound lies within ``tolerance`` of
    a threshold, ``tolerance = fraction * margin`` (without a margin: ``fraction`` * the CI half-width):
    noise of that size (another machine's floating point, one more seed) can move the bound across it.
    What would settle it: an interval narrow enough that the bound nearest the threshold would sit a
    full ``tolerance`` away from it (half-width ``|threshold - difference| - tolerance``), at the sizes
    ``needed_sizes`` estimates (``diffs``: the pair's differences); when the difference itself is
    within ``tolerance`` of the threshold no amount of data settles it (``settle`` is None).
    """
    half_width = (result.ci_high - result.ci_low) / 2
    tolerance = fraction * (margin if margin else half_width)
    if not tolerance > 0:
        return None
    significant = not result.wilcoxon_p >= ALPHA  # NaN (too few images) counts as significant: CI alone decides

    def outcome(low: float, high: float) -> str:  # verdict()'s decision, without its wording
        if margin and -margin < low and high < margin:
            return "equivalent"
        if low > 0 or high < 0:
            return ("A" if low > 0 else "B") if significant else "not resolved"
        return "not resolved"

    now = outcome(result.ci_low, result.ci_high)
    # Only a bound whose crossing of its threshold would change the verdict makes it fragile: an upper
    # bound near +margin matters for "equivalent", not for "B better" far below 0.
    candidates = []
    for t in [0.0] + ([-margin, margin] if margin else []):
        for name, value in (("ci_low", result.ci_low), ("ci_high", result.ci_high)):
            distance = abs(value - t)
            if distance >= tolerance:
                continue
            crossed = [2 * t - value] if value != t else [t - tolerance / 2, t + tolerance / 2]
            bounds = [(c, result.ci_high) if name == "ci_low" else (result.ci_low, c) for c in crossed]
            if any(outcome(*pair) != now for pair in bounds):
                candidates.append((distance, name, t))
    if not candidates:
        return None
    distance, bound, threshold = min(candidates)
    target = abs(threshold - result.difference) - tolerance
    settle = None
    if target > 0 and diffs is not None:
        settle = needed_sizes(diffs, half_width, target, result.n_folds,
                              f"sizes at which the 95% CI half-width would fall to {target:.3g}, so that the "
                              f"{bound} would sit at least {tolerance:.3g} from {threshold:+g}")
    return {"bound": bound, "value": getattr(result, bound), "threshold": threshold, "distance": distance,
            "tolerance": tolerance, "fraction": fraction, "basis": "margin" if margin else "CI half-width",
            "settle": settle}


def fragile_text(fragile: dict[str, Any], folds: int = 1) -> str:
    """One sentence: which bound is how close to which threshold, and what would settle it."""
    side = "upper" if fragile["bound"] == "ci_high" else "lower"
    text = (f"fragile verdict: the CI's {side} bound {fragile['value']:+.4f} is {fragile['distance']:.4f} from "
            f"{fragile['threshold']:+g}, within {fragile['tolerance']:.4g} ({fragile['fraction']:.0%} of the "
            f"{fragile['basis']}): noise of that size can flip it; ")
    settle = fragile["settle"]
    if settle is None:
        return text + "the difference itself is that close to the threshold, so more data would not settle it"
    seeds = f"about {settle['seeds']} seeds" + (f" ({settle['replicates']} fold x seed replicates)" if folds > 1
                                                  else "")
    images = (f"or about {settle['images']} images" + (" in the pool" if folds > 1 else " with these seeds")
              if settle.get("images") else "(more images alone would not do)")
    return text + f"{seeds} with these images, {images}, would settle it"


def verdict(result: PairedResult, p_adjusted: float, higher_is_better: bool, margin: float | None,
            a: str = "A", b: str = "B") -> str:
    """The decision for one pair.

    - ``equivalent within +-margin``: the whole 95% CI lies inside (-margin, +margin);
    - ``A better`` / ``B better``: the CI excludes 0 on A's (B's) side *and* the (Holm-adjusted)
      Wilcoxon p < 0.05 (both tests must agree);
    - otherwise, with a margin: ``not resolved: run more seeds or images`` with the sizes of
      ``needed_sizes``; without one: ``no difference shown``.
    """
    if margin is not None and -margin < result.ci_low and result.ci_high < margin:
        return f"equivalent within ±{margin:g}"
    if result.ci_low > 0 or result.ci_high < 0:
        a_side = (result.ci_low > 0) == higher_is_better
        if p_adjusted < ALPHA:
            return f"{a if a_side else b} better"
        shown = "the CI excludes 0 but the signed-rank test does not (p >= 0.05)"
    else:
        shown = "the CI includes 0"
    if margin is None:
        return f"no difference shown ({shown}; give --margin to test equivalence)"
    need = result.needed or {}
    folds = result.n_folds > 1
    images = (f"or about {need['images']} images " + ("in the pool" if folds else "with these seeds")
              if need.get("images") else
              "more images alone would not do at the observed " + ("replicate" if folds else "seed")
              + "-to-" + ("replicate" if folds else "seed") + " spread")
    seeds = f"about {need.get('seeds')} seeds" + (f" ({need.get('replicates')} fold x seed replicates)"
                                                  if folds else "")
    return (f"not resolved: run more seeds or images ({shown}; {seeds} with these "
            f"images, {images}, for a CI half-width of margin/2)")
