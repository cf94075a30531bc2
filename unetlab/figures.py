"""Figures logged with each run and by ``unetlab compare`` (matplotlib, headless)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["comparison_figure", "learning_curves", "prediction_figure"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(history: list[dict[str, float]], monitor: str):
    """Train/val loss and the monitored metric per epoch."""
    plt = _plt()
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = [h["epoch"] for h in history]
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    val = [(h["epoch"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax_loss.plot(*zip(*val), marker="o", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    points = [(h["epoch"], h[monitor]) for h in history if monitor in h]
    if points:
        ax_metric.plot(*zip(*points), marker="o")
    ax_metric.set(xlabel="epoch", ylabel=monitor, title=monitor)
    fig.tight_layout()
    return fig


def prediction_figure(images: np.ndarray, truths: np.ndarray, predictions: np.ndarray, num_classes: int):
    """One row per image: image | truth | prediction overlaid on the image (classes coloured)."""
    from .model import center_crop

    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for row, (image, truth, pred) in enumerate(zip(images, truths, predictions)):
        shown = image.transpose(1, 2, 0) if image.shape[0] == 3 else image[0]
        shown = (shown - shown.min()) / (np.ptp(shown) + 1e-8)
        h, w = truth.shape
        crop = center_crop(shown.T, w, h).T  # .T puts H and W last (H x W or H x W x 3) and back
        overlay = np.dstack([crop] * 3) if crop.ndim == 2 else crop.copy()
        for k in range(1, max(num_classes, 2)):
            overlay[pred == k] = 0.5 * overlay[pred == k] + 0.5 * np.array(cmap(k - 1)[:3])
        axes[row, 0].imshow(shown, cmap="gray")
        axes[row, 1].imshow(truth, cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
        axes[row, 2].imshow(overlay)
        for col, title in enumerate(("image", "truth", "prediction")):
            axes[row, col].set_axis_off()
            if row == 0:
                axes[row, col].set_title(title)
    fig.tight_layout()
    return fig


def _t_interval(values: list[float]) -> tuple[float, float] | None:
    """95% t-interval of the mean of ``values`` (None with fewer than 2)."""
    if len(values) < 2:
        return None
    from scipy import stats

    mean, sem = float(np.mean(values)), float(np.std(values, ddof=1) / np.sqrt(len(values)))
    half = float(stats.t.ppf(0.975, len(values) - 1)) * sem
    return mean - half, mean + half


def comparison_figure(result: dict[str, Any]):
    """Three panels from ``unetlab.compare.compare_runs``'s result.

    Left: the best value of each seed (points) with the mean and its 95% t-interval over seeds, per
    variant, on an axis zoomed to the data (no bars from 0 that hide small differences). Middle: a
    forest plot of the paired differences A - B with their 95% bootstrap intervals and the margin band
    (pairs without per-image tables: the seed-level difference, hollow, no interval). Right: the
    validation curves, one line per seed.
    """
    plt = _plt()
    metric, pairs = result["metric"], result["pairs"]
    fig, (ax_seeds, ax_forest, ax_curve) = plt.subplots(
        1, 3, figsize=(15, max(4.0, 0.45 * len(pairs) + 2)), gridspec_kw={"width_ratios": [1, 1.2, 1]})
    rng = np.random.default_rng(0)  # jitter only
    for i, by_seed in enumerate(result["seed_bests"].values()):
        values = list(by_seed.values())
        if not values:
            continue
        ax_seeds.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, color=f"C{i}", alpha=0.7, zorder=3,
                         label="one seed" if i == 0 else None)
        interval = _t_interval(values)
        mean = float(np.mean(values))
        if interval is not None:
            ax_seeds.errorbar([i + 0.3], [mean], yerr=[[mean - interval[0]], [interval[1] - mean]], fmt="o",
                              color="black", capsize=5, zorder=4,
                              label="mean, 95% t-interval over seeds" if i == 0 else None)
        else:
            ax_seeds.plot([i + 0.3], [mean], "o", color="black", zorder=4)
    names = list(result["seed_bests"])
    ax_seeds.set_xticks(range(len(names)), names, rotation=20 if len(names) > 3 else 0)
    ax_seeds.margins(y=0.15)
    better = "higher" if result["higher_is_better"] else "lower"
    ax_seeds.set(ylabel=f"best {metric}", title=f"best {metric} per seed ({better} is better)")
    ax_seeds.legend(fontsize=8)

    margin = result.get("margin")
    if margin:
        ax_forest.axvspan(-margin, margin, color="0.85", label=f"±margin {margin:g}")
    ax_forest.axvline(0, color="0.4", lw=1)
    for row, pair in enumerate(pairs):
        y = len(pairs) - 1 - row
        stats = pair.get("paired")
        if stats is not None:
            ax_forest.errorbar([stats["difference"]], [y], xerr=[[stats["difference"] - stats["ci_low"]],
                                                                 [stats["ci_high"] - stats["difference"]]],
                               fmt="o", color="C0", capsize=5, label="paired, 95% bootstrap CI" if row == 0 else None)
        elif pair["seed_level"]["difference"] is not None:
            ax_forest.plot([pair["seed_level"]["difference"]], [y], "o", mfc="none", color="C1",
                           label="seed-level only" if row == 0 else None)
    ax_forest.set_yticks(range(len(pairs)), [f"{p['a']} - {p['b']}" for p in reversed(pairs)])
    ax_forest.set_ylim(-0.8, len(pairs) - 0.2)
    ax_forest.margins(x=0.15)
    ax_forest.set(xlabel=f"difference in per-image {metric} (A - B)", title="paired differences")
    ax_forest.legend(fontsize=8, loc="best")

    for i, (name, runs) in enumerate(result["curves"].items()):
        for j, points in enumerate(runs):
            if points:
                ax_curve.plot(*zip(*points), color=f"C{i}", alpha=0.8, label=name if j == 0 else None)
    ax_curve.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch (one line per seed)")
    ax_curve.legend(fontsize=8)
    fig.tight_layout()
    return fig
