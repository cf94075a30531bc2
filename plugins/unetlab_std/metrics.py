"""Standard metrics, accumulated over a whole validation set (never a mean of per-batch ratios).

Predictions: one logit channel -> class 1 where the logit > 0; C channels -> argmax. Binary tasks
report the foreground class. Multi-class tasks report every class (``<metric>_c<k>``) and the mean
over classes (background excluded unless ``include_background``).

Empty-mask convention (as torchmetrics and scikit-learn with ``zero_division=0``, except the last
point): a class is *absent* when it is in neither truth nor prediction over the whole set
(TP + FP + FN = 0). An absent class is left out of the multi-class mean; a binary score whose
foreground is absent, or a mean with no present class, is 1.0 (nothing to find and nothing found is a
perfect result; scikit-learn would give 0 for precision/recall there). Any other 0/0 ratio scores 0:
precision of a class that is in the truth but never predicted (TP + FP = 0), recall of a class that
is predicted but not in the truth (TP + FN = 0). So a model that predicts only background gets
precision 0, not 1. ``hd95``: see ``HD95`` (empty masks differ from MONAI on purpose).
"""

from __future__ import annotations

import math

import numpy as np
import torch

import unetlab
from unetlab.model.unet import logits_to_classes as predictions


class ConfusionMetric:
    """Accumulates a K x K confusion matrix (rows: truth, columns: prediction) and derives a score from it."""

    key = "confusion"
    value_range = (0.0, 1.0)  # every score here is a ratio of pixel counts (unetlab.plugin_api.metric_ranges)
    pixel_additive = True  # counts add up over pixels: whole-image validation may feed an image in row bands

    def __init__(self, num_classes: int, include_background: bool = False, ignore_index: int | None = None):
        self.num_classes = max(int(num_classes), 2)
        self.include_background = include_background
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64)
        self._counts: torch.Tensor | None = None  # integer counts on the logits' device, added to ``matrix`` when read

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch (logits N x C x H x W, target N x H x W class indices).

        Counts are added on the logits' device with a fixed-size scatter (no boolean mask, no copy to
        the host), so validating on a GPU never waits for the CPU; ignored pixels go to a spare bin.
        """
        k = self.num_classes
        pred = predictions(logits.detach()).reshape(-1)
        truth = target.detach().reshape(-1).long()  # a uint8 mask would overflow in truth * k
        keep = (truth >= 0) & (truth < k)
        if self.ignore_index is not None:
            keep &= truth != self.ignore_index
        index = torch.where(keep, truth * k + pred.clamp(0, k - 1), torch.full_like(truth, k * k))
        if self._counts is not None and self._counts.device != index.device:
            self._flush()
        if self._counts is None:
            self._counts = torch.zeros(k * k + 1, dtype=torch.int64, device=index.device)
        self._counts.scatter_add_(0, index, torch.ones_like(index))

    def _flush(self) -> None:
        if self._counts is not None:
            k = self.num_classes
            self.matrix += self._counts[:k * k].reshape(k, k).to("cpu", torch.float64)
            self._counts = None

    def confusion(self) -> torch.Tensor:
        """The K x K confusion matrix of everything added so far (on the CPU, float64)."""
        self._flush()
        return self.matrix

    def counts(self):
        """True positives, false positives and false negatives per class."""
        matrix = self.confusion()
        tp = matrix.diag()
        return tp, matrix.sum(0) - tp, matrix.sum(1) - tp

    def per_class(self) -> torch.Tensor:  # overridden
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        """This metric's value (and per-class values for several classes)."""
        values = self.per_class()
        if self.num_classes == 2:
            v = values[1].item()
            return {self.key: 1.0 if math.isnan(v) else v}
        first = 0 if self.include_background else 1
        chosen = values[first:]
        defined = chosen[~torch.isnan(chosen)]
        out = {self.key: defined.mean().item() if defined.numel() else 1.0}
        out.update({f"{self.key}_c{k}": values[k].item() for k in range(self.num_classes)})
        return out


def _ratio(num: torch.Tensor, den: torch.Tensor, tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    """num / den per class; NaN for an absent class (TP + FP + FN = 0), 0 for any other 0/0."""
    ratio = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    return torch.where(tp + fp + fn > 0, ratio, torch.full_like(num, float("nan")))


class IoU(ConfusionMetric):
    """Intersection over union (Jaccard): TP / (TP + FP + FN)."""

    key = "iou"

    def per_class(self) -> torch.Tensor:
        tp, fp, fn = self.counts()
        return _ratio(tp, tp + fp + fn, tp, fp, fn)


class Dice(ConfusionMetric):
    """Dice (F1): 2TP / (2TP + FP + FN)."""

    key = "dice"

    def per_class(self) -> torch.Tensor:
        tp, fp, fn = self.counts()
        return _ratio(2 * tp, 2 * tp + fp + fn, tp, fp, fn)


class Precision(ConfusionMetric):
    """Precision: TP / (TP + FP)."""

    key = "precision"

    def per_class(self) -> torch.Tensor:
        tp, fp, fn = self.counts()
        return _ratio(tp, tp + fp, tp, fp, fn)


class Recall(ConfusionMetric):
    """Recall (sensitivity): TP / (TP + FN)."""

    key = "recall"

    def per_class(self) -> torch.Tensor:
        tp, fp, fn = self.counts()
        return _ratio(tp, tp + fn, tp, fp, fn)


class Accuracy(ConfusionMetric):
    """Pixel accuracy: correctly classified pixels / all (non-ignored) pixels."""

    key = "accuracy"

    def __init__(self, num_classes: int, ignore_index: int | None = None):  # every class counts: no include_background
        super().__init__(num_classes, include_background=True, ignore_index=ignore_index)

    def compute(self) -> dict[str, float]:
        matrix = self.confusion()
        total = matrix.sum().item()
        return {self.key: matrix.trace().item() / total if total else 1.0}


def _surface_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distances from each boundary pixel of ``a`` to the nearest boundary pixel of ``b``."""
    from scipy import ndimage

    boundary_a = a & ~ndimage.binary_erosion(a, border_value=0)
    boundary_b = b & ~ndimage.binary_erosion(b, border_value=0)
    distance_to_b = ndimage.distance_transform_edt(~boundary_b)
    return distance_to_b[boundary_a]


def hausdorff95(pred: np.ndarray, truth: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance (pixels) between two binary masks.

    Both empty: 0.0. Exactly one empty: the image diagonal (the worst possible distance), so that a
    missed or hallucinated object is penalised rather than silently skipped. This differs from MONAI's
    ``compute_hausdorff_distance`` on purpose: MONAI gives NaN or inf (with a warning) when a mask is
    empty, which would drop exactly the failures from the mean or make it infinite.
    """
    pred, truth = pred.astype(bool), truth.astype(bool)
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return float(math.hypot(*pred.shape))
    return float(max(np.percentile(_surface_distances(pred, truth), 95),
                     np.percentile(_surface_distances(truth, pred), 95)))


class HD95:
    """95th-percentile Hausdorff distance (pixels), per image and class, averaged over images (lower is better)."""

    value_range = (0.0, None)  # a distance (unetlab.plugin_api.metric_ranges)

    def __init__(self, num_classes: int, include_background: bool = False):
        self.num_classes = max(int(num_classes), 2)
        self.include_background = include_background
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.values: dict[int, list[float]] = {k: [] for k in range(self.num_classes)}

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch: a distance per image and class."""
        pred = predictions(logits.detach()).cpu().numpy()
        truth = target.detach().cpu().numpy()
        classes = range(0 if self.include_background else 1, self.num_classes)
        for p, t in zip(pred, truth):
            for k in classes:
                self.values[k].append(hausdorff95(p == k, t == k))

    def compute(self) -> dict[str, float]:
        """Mean HD95 over images (and over classes for several classes)."""
        per_class = {k: float(np.mean(v)) for k, v in self.values.items() if v}
        if not per_class:
            return {"hd95": 0.0}
        out = {"hd95": float(np.mean(list(per_class.values())))}
        if self.num_classes > 2:
            out.update({f"hd95_c{k}": v for k, v in per_class.items()})
        return out


@unetlab.hookimpl
def register_metrics(register):
    register("iou", IoU, direction="max")
    register("dice", Dice, direction="max")
    register("precision", Precision, direction="max")
    register("recall", Recall, direction="max")
    register("accuracy", Accuracy, direction="max")
    register("hd95", HD95, direction="min")
