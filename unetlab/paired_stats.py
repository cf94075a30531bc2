"""Paired statistics for two variants evaluated on the same images and seeds (used by ``unetlab compare``).

The input of every function here is a matrix of per-image differences ``diffs[s, i] = A - B`` for
seed ``s`` and validation image ``i`` (both variants trained with seed ``s``, both evaluated on image
``i``). From it:

- the mean difference and its 95% confidence interval from a hierarchical bootstrap: each
  replicate resamples the seeds with replacement, then, within each drawn seed, the images with
  replacement, and takes the mean of the drawn differences (both sources of variation count);
- a Wilcoxon signed-rank test across images on the differences averaged over seeds (SciPy);
- effect sizes: d_z (mean / sd of those image differences) and the matched-pairs rank-biserial r;
- Holm's step-down correction when several pairs are tested;
- a verdict, and with a margin an estimate of how many seeds or images would resolve it.

Bootstrap draws are reproducible and defined exactly (a test redoes them in a plain loop): with
``rng = numpy.random.default_rng(seed)``, replicate b takes ``u = rng.random(S + S*I)``; drawn seed j
is ``floor(u[j] * S)`` and its drawn image k is ``floor(u[S + j*I + k] * I)``.
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
    "bootstrap_replicates",
    "hierarchical_ci",
    "holm",
    "needed_sizes",
    "paired_comparison",
    "rank_biserial",
    "verdict",
    "wilcoxon_signed_rank",
]

BOOTSTRAP_SEED = 20240607
RESAMPLES = 10_000
LEVEL = 0.95
ALPHA = 0.05
_Z = 1.959963984540054  # standard normal 97.5% quantile
_CHUNK_VALUES = 4_000_000  # uniforms drawn per chunk: bounds memory for large S x I


def _matrix(diffs: Any) -> np.ndarray:
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] < 1 or d.shape[1] < 1:
        raise ValueError(f"diffs must be a non-empty seeds x images matrix, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("diffs contain NaN or inf; drop those images first")
    return d


def bootstrap_replicates(diffs: Any, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """Hierarchical bootstrap replicates of the mean difference (seeds, then images within seeds)."""
    d = _matrix(diffs)
    n_seeds, n_images = d.shape
    width = n_seeds + n_seeds * n_images
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    chunk = max(1, _CHUNK_VALUES // width)
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        u = rng.random((count, width))  # the same stream as `count` calls of rng.random(width)
        seeds = np.minimum((u[:, :n_seeds] * n_seeds).astype(np.int64), n_seeds - 1)
        images = np.minimum((u[:, n_seeds:] * n_images).astype(np.int64), n_images - 1)
        images = images.reshape(count, n_seeds, n_images)
        out[start:start + count] = d[seeds[:, :, None], images].mean(axis=(1, 2))
    return out


def hierarchical_ci(diffs: Any, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                    level: float = LEVEL) -> tuple[float, float, float]:
    """(mean difference, lower, upper): percentile interval of the hierarchical bootstrap."""
    d = _matrix(diffs)
    replicates = bootstrap_replicates(d, resamples, seed)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return float(d.mean()), float(low), float(high)


def wilcoxon_signed_rank(differences: Sequence[float]) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test (SciPy's defaults); 1.0 when every difference is 0."""
    from scipy import stats

    d = np.asarray(differences, dtype=np.float64)
    if d.size == 0 or not np.any(d != 0):
        return 1.0
    return float(stats.wilcoxon(d).pvalue)


def rank_biserial(differences: Sequence[float]) -> float:
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


def needed_sizes(diffs: Any, half_width: float, target: float) -> dict[str, Any]:
    """How many seeds (images fixed) or images (seeds fixed) would shrink the CI half-width to ``target``.

    The bootstrap's variance behaves as ``B/S + 2W/(S*I)`` (W: variance of the image differences within
    a seed; B: what the spread of the seed means leaves after W/I; resampling seeds and then images
    counts W twice). Seeds: the half-width falls as 1/sqrt(S), so ``ceil(S * (half_width / target)^2)``.
    Images: that variance model, scaled to the observed half-width, solved for I; ``None`` when the
    seed-to-seed part alone is already too wide at these seeds (more images cannot help).
    """
    d = _matrix(diffs)
    n_seeds, n_images = d.shape
    seeds = n_seeds if half_width <= target else math.ceil(n_seeds * (half_width / target) ** 2)
    within = float(np.mean(d.var(axis=1, ddof=1))) if n_images > 1 else 0.0
    between = max(0.0, float(d.mean(axis=1).var(ddof=1)) - within / n_images) if n_seeds > 1 else 0.0
    images: int | None = n_images
    if half_width > target:
        current = between / n_seeds + 2 * within / (n_seeds * n_images)
        room = current * (target / half_width) ** 2 - between / n_seeds
        images = math.ceil(2 * within / (n_seeds * room)) if room > 0 and within > 0 else None
    return {"target_half_width": target, "seeds": seeds, "images": images, "rule":
            "sizes at which the 95% CI half-width would fall to margin/2, from the observed spread"}


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

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready)."""
        return asdict(self)


def paired_comparison(diffs: Any, margin: float | None = None, resamples: int = RESAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> PairedResult:
    """Everything for one pair from its seeds x images difference matrix (see the module docstring)."""
    d = _matrix(diffs)
    mean, low, high = hierarchical_ci(d, resamples, seed)
    per_image = d.mean(axis=0)  # the Wilcoxon test pairs images, each averaged over the seeds
    sd = float(per_image.std(ddof=1)) if per_image.size > 1 else 0.0
    needed = None
    if margin is not None and margin > 0:
        needed = needed_sizes(d, (high - low) / 2, margin / 2)
    return PairedResult(mean, low, high, d.shape[0], d.shape[1], wilcoxon_signed_rank(per_image),
                        rank_biserial(per_image), mean / sd if sd > 0 else None, needed)


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
    images = (f"or about {need['images']} images with these seeds" if need.get("images") else
              "more images alone would not do at the observed seed-to-seed spread")
    return (f"not resolved: run more seeds or images ({shown}; about {need.get('seeds')} seeds with these "
            f"images, {images}, for a CI half-width of margin/2)")
