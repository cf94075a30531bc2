"""Figures logged with each run and by ``unetlab compare`` (matplotlib, headless)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["comparison_figure", "foreground_iou", "learning_curves", "prediction_figure"]


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


TRUTH_COLOUR, PREDICTION_COLOUR = "#00d000", "#ff00ff"  # green and magenta: apart for most colour vision


def _class_colours(num_classes: int) -> np.ndarray:
    """RGB per class index: background black, class k the k-th tab10 colour (white past the palette)."""
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    colours = [(0.0, 0.0, 0.0)] + [cmap((k - 1) % 10)[:3] for k in range(1, max(num_classes, 2))]
    return np.array(colours)


def _paint(mask: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """A class-index mask as an RGB image; indices outside the classes (ignored pixels) are white."""
    out = np.ones((*mask.shape, 3))
    known = (mask >= 0) & (mask < len(colours))
    out[known] = colours[mask[known]]
    return out


def foreground_iou(truth: np.ndarray, prediction: np.ndarray, num_classes: int) -> float | None:
    """IoU of foreground (any class > 0) between two masks, over the pixels whose truth is a class
    (ignored pixels left out); None when neither mask has foreground there."""
    valid = (truth >= 0) & (truth < max(num_classes, 2))
    t, p = (truth > 0) & valid, (prediction > 0) & valid
    union = int(np.count_nonzero(t | p))
    return None if union == 0 else int(np.count_nonzero(t & p)) / union


def _outline(ax, mask: np.ndarray, colour, style: str) -> None:
    """The boundary of a boolean mask, at half a pixel outside its pixels (matplotlib's contour at 0.5)."""
    if mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.6, linestyles=style)


def prediction_figure(images: Sequence[np.ndarray], truths: Sequence[np.ndarray], predictions: Sequence[np.ndarray],
                      num_classes: int):
    """One row per image: image | truth | prediction (solid masks in the same class colours, the
    prediction titled with its foreground IoU) | outlines of truth (solid) and prediction (dashed) drawn
    over the image: green and magenta for a binary task, the class colours otherwise."""
    from matplotlib.lines import Line2D

    from unetlab.model.unet import center_crop

    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(10, 2.6 * n), squeeze=False)
    colours = _class_colours(num_classes)
    binary = num_classes <= 2
    for row, (image, truth, pred) in enumerate(zip(images, truths, predictions)):
        shown = image.transpose(1, 2, 0) if image.shape[0] == 3 else image[0]
        shown = (shown - shown.min()) / (np.ptp(shown) + 1e-8)
        h, w = truth.shape
        crop = center_crop(shown.T, w, h).T  # .T puts H and W last (H x W or H x W x 3) and back
        axes[row, 0].imshow(shown, cmap="gray")
        axes[row, 1].imshow(_paint(truth, colours), interpolation="nearest")
        axes[row, 2].imshow(_paint(pred, colours), interpolation="nearest")
        iou = foreground_iou(truth, pred, num_classes)
        axes[row, 2].set_title("prediction" + ("" if iou is None else f" (IoU {iou:.2f})"), fontsize=9)
        axes[row, 3].imshow(crop, cmap="gray" if crop.ndim == 2 else None)
        for k in range(1, max(num_classes, 2)):
            _outline(axes[row, 3], truth == k, TRUTH_COLOUR if binary else colours[k], "solid")
            _outline(axes[row, 3], pred == k, PREDICTION_COLOUR if binary else colours[k], "dashed")
        for col in range(4):
            axes[row, col].set_axis_off()
        if row == 0:
            for col, title in ((0, "image"), (1, "truth"), (3, "outlines over the image")):
                axes[row, col].set_title(title, fontsize=9)
    handles = [Line2D([], [], color=TRUTH_COLOUR if binary else "0.3", lw=1.6, ls="solid", label="truth"),
               Line2D([], [], color=PREDICTION_COLOUR if binary else "0.3", lw=1.6, ls="dashed", label="prediction")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.04 if n > 1 else 0.08, 1, 1))
    return fig


def _t_interval(values: list[float]) -> tuple[float, float] | None:
    """95% t-interval of the mean of ``values`` (None with fewer than 2)."""
    if len(values) < 2:
        return None
    from scipy import stats

    mean, sem = float(np.mean(values)), float(np.std(values, ddof=1) / np.sqrt(len(values)))
    half = float(stats.t.ppf(0.975, len(values) - 1)) * sem
    return mean - half, mean + half


def _short_verdict(pair: dict[str, Any]) -> str:
    """The verdict's decision without its explanation ("not resolved", "x better"), marked when fragile or
    when data was dropped."""
    text = str(pair["verdict"]).split(" [from ")[0]
    short = re.split(r"[:(]", text)[0].strip()
    marks = (["fragile"] if pair.get("fragile") else []) + (
        [f"{pair['dropped']['dropped']} values dropped"] if pair.get("dropped") else [])
    return short + (f" ({', '.join(marks)})" if marks else "")


def _pair_n(pair: dict[str, Any], cross_validated: bool) -> str:
    """n of a pair: replicates x images (per-image pairs), or replicates per variant (seed-level only)."""
    s = pair.get("paired")
    if s is not None:
        if cross_validated:
            return f"n = {s['n_folds']} folds x {s['n_seeds']} seeds, {s['n_images']} images"
        return f"n = {s['n_seeds']} seeds x {s['n_images']} images"
    counts = pair["seed_level"].get("replicates")
    return f"n = {counts[0]} vs {counts[1]} {'replicates' if cross_validated else 'seeds'}" if counts else ""


def comparison_figure(result: dict[str, Any]):
    """Three panels from ``unetlab.analysis.compare.compare_runs``'s result, with the verdicts, n and the margin in
    their text.

    Left: the best value of each replicate (seed, or fold x seed) with the mean and its 95% t-interval,
    per variant, on an axis zoomed to the data (no bars from 0 that hide small differences); with folds
    also each variant's cross-validation estimate and its bootstrap interval. Middle: a forest plot of the
    paired differences A - B with their 95% bootstrap intervals and the margin band (pairs without
    per-image tables: the seed-level difference, hollow, no interval); each pair's label carries its
    verdict (marked when fragile or when data was dropped) and n. Right: the validation curves, one line
    per replicate. The figure's title: metric, direction, margin and replicates x images.
    """
    plt = _plt()
    metric, pairs = result["metric"], result["pairs"]
    cross_validated = bool(result.get("cross_validated"))
    unit = "replicate (fold x seed)" if cross_validated else "seed"
    fig, (ax_seeds, ax_forest, ax_curve) = plt.subplots(
        1, 3, figsize=(15, max(4.5, 0.8 * len(pairs) + 2.5)), gridspec_kw={"width_ratios": [1, 1.2, 1]})
    rng = np.random.default_rng(0)  # jitter only
    for i, by_seed in enumerate(result["seed_bests"].values()):
        values = list(by_seed.values())
        if not values:
            continue
        ax_seeds.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, color=f"C{i}", alpha=0.7, zorder=3,
                         label=f"one {unit}" if i == 0 else None)
        interval = _t_interval(values)
        mean = float(np.mean(values))
        if interval is not None:
            ax_seeds.errorbar([i + 0.3], [mean], yerr=[[mean - interval[0]], [interval[1] - mean]], fmt="o",
                              color="black", capsize=5, zorder=4,
                              label=f"mean, 95% t-interval over {unit.split(' ')[0]}s" if i == 0 else None)
        else:
            ax_seeds.plot([i + 0.3], [mean], "o", color="black", zorder=4)
        cv = (result.get("cv") or {}).get(list(result["seed_bests"])[i])
        if cv:
            ax_seeds.errorbar([i - 0.3], [cv["mean"]], yerr=[[cv["mean"] - cv["ci_low"]], [cv["ci_high"] - cv["mean"]]],
                              fmt="s", color="C3", capsize=5, zorder=4,
                              label="CV estimate (per image), 95% CI" if i == 0 else None)
    names = list(result["seed_bests"])
    ax_seeds.set_xticks(range(len(names)), names, rotation=20 if len(names) > 3 else 0)
    ax_seeds.margins(y=0.15)
    better = "higher" if result["higher_is_better"] else "lower"
    score = f"{metric} of the best checkpoint" if result.get("split") == "test" else f"best {metric}"
    ax_seeds.set(ylabel=score, title=f"{score} per {unit.split(' ')[0]} ({better} is better)")
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
    ax_forest.set_yticks(range(len(pairs)), [f"{p['a']} - {p['b']}\n{_short_verdict(p)}\n{_pair_n(p, cross_validated)}"
                                             for p in reversed(pairs)], fontsize=8)
    ax_forest.set_ylim(-0.8, len(pairs) - 0.2)
    ax_forest.margins(x=0.15)
    ax_forest.set(xlabel=f"difference in per-image {metric} (A - B)",
                  title="paired differences, 95% CI; " + (f"margin ±{margin:g}" if margin else
                                                          "no margin (equivalence not tested)"))
    if ax_forest.get_legend_handles_labels()[0]:
        ax_forest.legend(fontsize=8, loc="best")
    if not pairs:
        ax_forest.text(0.5, 0.5, "no pairs: one variant" + (" (its cross-validation estimate is on the left)"
                                                            if cross_validated else ""),
                       transform=ax_forest.transAxes, ha="center", va="center", fontsize=9, wrap=True)

    for i, (name, runs) in enumerate(result["curves"].items()):
        for j, points in enumerate(runs):
            if points:
                ax_curve.plot(*zip(*points), color=f"C{i}", alpha=0.8, label=name if j == 0 else None)
    ax_curve.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch (one line per {unit.split(' ')[0]})")
    ax_curve.legend(fontsize=8)
    rows = result.get("rows") or []

    def counts(key: str) -> str:
        return "/".join(sorted({str(r.get(key)) for r in rows})) or "?"

    n = (f"{counts('replicates')} replicates ({counts('folds')} folds x {counts('seeds')} seeds)" if cross_validated
         else f"{counts('seeds')} seeds")
    images = "/".join(str(i) for i in sorted({p["paired"]["n_images"] for p in pairs if p.get("paired")}))
    per_image_values = "/".join(str(v) for v in sorted({c["n_values"] for c in (result.get("cv") or {}).values()
                                                         if c and "per-image" in c["source"]}))
    n += (f" x {images} images" if images and not cross_validated else f", {images} images paired" if images
          else f", {per_image_values} per-image values" if per_image_values else "")
    fig.suptitle(f"{metric} ({better} is better): n = {len(rows)} variant(s) x {n}; "
                 + (f"margin ±{margin:g}" if margin else "no margin"), fontsize=11)
    fig.tight_layout()
    return fig
