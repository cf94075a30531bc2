"""Figures logged with each run and by ``unetlab compare`` (matplotlib, headless)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["learning_curves", "prediction_figure", "comparison_figure"]


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
    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for row, (image, truth, pred) in enumerate(zip(images, truths, predictions)):
        shown = image.transpose(1, 2, 0) if image.shape[0] == 3 else image[0]
        shown = (shown - shown.min()) / (np.ptp(shown) + 1e-8)
        h, w = truth.shape
        top, left = (shown.shape[0] - h) // 2, (shown.shape[1] - w) // 2
        crop = shown[top:top + h, left:left + w]
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


def comparison_figure(rows: list[dict[str, Any]], metric: str, curves: dict[str, list[list[tuple[int, float]]]]):
    """Bars (mean +- std over seeds) of the best ``metric`` per variant, and validation curves."""
    plt = _plt()
    fig, (ax_bar, ax_curve) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["variant"] for r in rows]
    means = [r[f"best_{metric}_mean"] for r in rows]
    stds = [r[f"best_{metric}_std"] or 0.0 for r in rows]
    ax_bar.bar(names, means, yerr=stds, capsize=6, color=[f"C{i}" for i in range(len(rows))])
    ax_bar.set(ylabel=f"best {metric}", title=f"best {metric} (mean +- std over seeds)")
    for i, (name, runs) in enumerate(curves.items()):
        for j, points in enumerate(runs):
            if points:
                ax_curve.plot(*zip(*points), color=f"C{i}", alpha=0.8, label=name if j == 0 else None)
    ax_curve.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch (one line per seed)")
    ax_curve.legend()
    fig.tight_layout()
    return fig
