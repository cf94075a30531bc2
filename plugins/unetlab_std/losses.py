"""Standard losses, computed from logits in float32 (safe under mixed precision).

Target: class indices (N x H x W, int64). Logits with one channel are binary (sigmoid, foreground =
class 1); with C > 1 channels they are C classes (softmax). ``ignore_index`` pixels count nowhere.
Region losses (dice, iou, tversky) sum over the whole batch per class, then average the classes.
Every loss is 0 (with a finite, zero gradient) when every pixel of a batch is ignored.

Conventions that differ from a peer on purpose:

- Smoothing: region losses compute (TP + s) / (TP + alpha FP + beta FN + s). For dice (alpha = beta =
  0.5) that is (2TP + 2s) / (2TP + FP + FN + 2s): MONAI's ``DiceLoss`` with ``smooth_nr = smooth_dr =
  2s``, and segmentation_models_pytorch's ``smooth = 2s`` only when its ``eps`` is 0.
- Absent classes: a class absent from the batch's truth is kept in the class mean with a smoothed
  penalty s / (alpha FP + s), so predicting it anyway still costs something (smp drops such classes
  from the mean for dice; Lovasz here skips them, as its authors' "present" mode).
- Focal ``alpha``: binary, alpha weighs the foreground and 1 - alpha the background (Lin et al.,
  torchvision's ``sigmoid_focal_loss``); several classes, alpha is one global scale on every pixel,
  not a per-class weight (use ``cross_entropy``'s ``class_weights`` for that).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import unetlab


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half precision to float32 (mixed precision); keep float32/float64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@functools.lru_cache(maxsize=64)
def _constant(values: tuple[float, ...] | float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A constant tensor made once per device and dtype: building it from host data at every step would
    copy it to the GPU and make the CPU wait each time."""
    with torch.inference_mode(False):  # made under inference mode, it could never be used in training after
        return torch.tensor(values, device=device, dtype=dtype)


def _valid(target: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    return torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index


def _probs_onehot(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None):
    """Probabilities and one-hot truth (N x K x H x W, float32) and the valid-pixel mask (N x 1 x H x W)."""
    logits = _f32(logits)
    valid = _valid(target, ignore_index).unsqueeze(1)
    safe = torch.where(valid.squeeze(1), target, torch.zeros_like(target))
    if logits.shape[1] == 1:
        return torch.sigmoid(logits), (safe == 1).to(logits.dtype).unsqueeze(1), valid
    onehot = F.one_hot(safe, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
    return torch.softmax(logits, dim=1), onehot, valid


def _class_mean(values: torch.Tensor, class_weights: list[float] | None) -> torch.Tensor:
    if class_weights is None:
        return values.mean()
    w = _constant(tuple(class_weights), values.device, values.dtype)
    if w.numel() != values.numel():
        raise ValueError(f"class_weights has {w.numel()} values, the model has {values.numel()} output channel(s)")
    return (values * w).sum() / w.sum()


def _region_counts(logits, target, ignore_index):
    probs, truth, valid = _probs_onehot(logits, target, ignore_index)
    probs, truth = probs * valid, truth * valid
    dims = (0, 2, 3)
    tp = (probs * truth).sum(dims)
    fp = (probs * (1 - truth)).sum(dims)
    fn = ((1 - probs) * truth).sum(dims)
    return tp, fp, fn


class BCELoss(torch.nn.Module):
    """Binary cross-entropy with logits (one-vs-rest per channel when there are several)."""

    def __init__(self, num_classes: int, pos_weight: float | None = None, ignore_index: int | None = None):
        super().__init__()
        self.pos_weight, self.ignore_index = pos_weight, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _, truth, valid = _probs_onehot(logits, target, self.ignore_index)
        pw = (None if self.pos_weight is None
              else _constant(float(self.pos_weight), logits.device, logits.dtype))
        per_pixel = F.binary_cross_entropy_with_logits(_f32(logits), truth, reduction="none", pos_weight=pw)
        valid = valid.expand_as(per_pixel).to(per_pixel.dtype)
        return (per_pixel * valid).sum() / valid.sum().clamp_min(1)


class CrossEntropyLoss(torch.nn.Module):
    """Softmax cross-entropy (binary cross-entropy when the model has one output channel)."""

    def __init__(self, num_classes: int, class_weights: list[float] | None = None,
                 ignore_index: int | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.class_weights, self.ignore_index, self.label_smoothing = class_weights, ignore_index, label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] == 1:
            return BCELoss(2, ignore_index=self.ignore_index)(logits, target)
        logits = _f32(logits)
        w = None if self.class_weights is None else _constant(tuple(self.class_weights), logits.device,
                                                              logits.dtype)
        ignore = -100 if self.ignore_index is None else self.ignore_index
        # PyTorch's "mean" divides by the summed weight of the valid pixels, which is 0/0 = NaN when every
        # pixel is ignored; dividing ourselves gives the same mean and 0 for an all-ignored batch.
        per_pixel = F.cross_entropy(logits, target, weight=w, label_smoothing=self.label_smoothing,
                                    ignore_index=ignore, reduction="none")
        valid = target != ignore
        safe = torch.where(valid, target, torch.zeros_like(target))
        pixel_weight = valid.to(logits.dtype) if w is None else w[safe] * valid
        total = pixel_weight.sum()
        return per_pixel.sum() / torch.where(total > 0, total, torch.ones_like(total))


class TverskyLoss(torch.nn.Module):
    """1 - Tversky index TP / (TP + alpha FP + beta FN), soft, per class, averaged (Salehi et al. 2017)."""

    def __init__(self, num_classes: int, alpha: float = 0.5, beta: float = 0.5, smooth: float = 1.0,
                 class_weights: list[float] | None = None, ignore_index: int | None = None):
        super().__init__()
        self.alpha, self.beta, self.smooth = alpha, beta, smooth
        self.class_weights, self.ignore_index = class_weights, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        tp, fp, fn = _region_counts(logits, target, self.ignore_index)
        index = (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)
        return 1 - _class_mean(index, self.class_weights)


def dice(num_classes: int, smooth: float = 1.0, class_weights: list[float] | None = None,
         ignore_index: int | None = None) -> TverskyLoss:
    """1 - soft Dice 2TP / (2TP + FP + FN) per class, averaged."""
    return TverskyLoss(num_classes, 0.5, 0.5, smooth, class_weights, ignore_index)


def iou(num_classes: int, smooth: float = 1.0, class_weights: list[float] | None = None,
        ignore_index: int | None = None) -> TverskyLoss:
    """1 - soft Jaccard TP / (TP + FP + FN) per class, averaged."""
    return TverskyLoss(num_classes, 1.0, 1.0, smooth, class_weights, ignore_index)


class BCEIoULoss(torch.nn.Module):
    """The seed blog's loss: BCE - soft IoU + 1 (cross-entropy - mean soft IoU + 1 for several classes)."""

    def __init__(self, num_classes: int, smooth: float = 1e-7, ignore_index: int | None = None):
        super().__init__()
        self.ce = CrossEntropyLoss(num_classes, ignore_index=ignore_index)
        self.iou = iou(num_classes, smooth=smooth, ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.ce(logits, target) + self.iou(logits, target)  # CE - IoU + 1 == CE + (1 - IoU)


class FocalLoss(torch.nn.Module):
    """Focal loss -alpha_t (1 - p_t)^gamma log p_t (Lin et al. 2017), mean over valid pixels."""

    def __init__(self, num_classes: int, gamma: float = 2.0, alpha: float | None = 0.25,
                 ignore_index: int | None = None):
        super().__init__()
        self.gamma, self.alpha, self.ignore_index = gamma, alpha, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = _f32(logits)
        valid = _valid(target, self.ignore_index)
        safe = torch.where(valid, target, torch.zeros_like(target))
        if logits.shape[1] == 1:
            z = logits[:, 0]
            y = (safe == 1).to(z.dtype)
            log_pt = -F.binary_cross_entropy_with_logits(z, y, reduction="none")
            alpha_t = None if self.alpha is None else self.alpha * y + (1 - self.alpha) * (1 - y)
        else:
            log_pt = F.log_softmax(logits, dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
            alpha_t = None if self.alpha is None else torch.full_like(log_pt, self.alpha)
        loss = -((1 - log_pt.exp()) ** self.gamma) * log_pt
        if alpha_t is not None:
            loss = alpha_t * loss
        valid = valid.to(loss.dtype)
        return (loss * valid).sum() / valid.sum().clamp_min(1)


def _lovasz_grad(sorted_truth: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. sorted errors (Berman et al. 2018)."""
    gts = sorted_truth.sum()
    # integer running counts: exact, and deterministic on CUDA (a floating-point cumsum is not)
    truth = sorted_truth.long()
    intersection = gts - truth.cumsum(0).to(sorted_truth.dtype)
    union = gts + (1 - truth).cumsum(0).to(sorted_truth.dtype)
    jaccard = 1.0 - intersection / union
    if sorted_truth.numel() > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


class LovaszLoss(torch.nn.Module):
    """Lovasz loss (Berman et al. 2018): hinge for binary logits, softmax for several classes."""

    def __init__(self, num_classes: int, per_image: bool = False, ignore_index: int | None = None):
        super().__init__()
        self.per_image, self.ignore_index = per_image, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = _f32(logits)
        if self.per_image:
            return torch.stack([self._flat(l.unsqueeze(0), t.unsqueeze(0)) for l, t in zip(logits, target)]).mean()
        return self._flat(logits, target)

    def _flat(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Ignored pixels are not dropped with a boolean mask (a data-dependent size, read on the host: a
        # GPU sync per step); they stay in place as background with errors that add nothing instead.
        valid = _valid(target, self.ignore_index).reshape(-1)
        labels = target.reshape(-1)
        if logits.shape[1] == 1:
            y = ((labels == 1) & valid).to(logits.dtype)
            errors = 1 - logits.reshape(-1) * (2 * y - 1)
            errors = torch.where(valid, errors, torch.full_like(errors, float("-inf")))  # relu(-inf) = 0
            errors_sorted, order = torch.sort(errors, descending=True)
            return torch.dot(F.relu(errors_sorted), _lovasz_grad(y[order]))
        probs = torch.softmax(logits, 1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
        losses, present = [], []
        for c in range(logits.shape[1]):
            fg = ((labels == c) & valid).to(probs.dtype)
            errors = torch.where(valid, (fg - probs[:, c]).abs(), torch.zeros_like(fg))  # 0 error adds 0
            errors_sorted, order = torch.sort(errors, descending=True)
            losses.append(torch.dot(errors_sorted, _lovasz_grad(fg[order])))
            present.append(fg.sum() > 0)  # classes absent from the batch count nowhere ("present" classes)
        present_mask = torch.stack(present).to(probs.dtype)
        return (torch.stack(losses) * present_mask).sum() / present_mask.sum().clamp_min(1)


@unetlab.hookimpl
def register_losses(register):
    register("bce", BCELoss, direction="min")
    register("cross_entropy", CrossEntropyLoss, direction="min")
    register("dice", dice, direction="min")
    register("iou", iou, direction="min")
    register("bce_iou", BCEIoULoss, direction="min")
    register("focal", FocalLoss, direction="min")
    register("tversky", TverskyLoss, direction="min")
    register("lovasz", LovaszLoss, direction="min")
