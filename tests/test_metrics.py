"""Metrics against scikit-learn and a brute-force Hausdorff distance; accumulation over batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    jaccard_score,
    precision_score,
    recall_score,
)

import unetlab


def metric(name, num_classes=2, **params):
    return unetlab.create("metric", name, num_classes=num_classes, **params)


def logits_for(pred: np.ndarray, k: int) -> torch.Tensor:
    """Logits whose prediction is ``pred`` (binary: one channel)."""
    pred = torch.as_tensor(pred)
    if k == 2:
        return (pred.double() * 2 - 1)[:, None] * 5
    return torch.nn.functional.one_hot(pred, k).permute(0, 3, 1, 2).double() * 5


def accumulate(name, k, preds, truths, **params):
    m = metric(name, k, **params)
    for p, t in zip(preds, truths):
        m.update(logits_for(p, k), torch.as_tensor(t))
    return m.compute()


SKLEARN = {"iou": jaccard_score, "dice": f1_score, "precision": precision_score, "recall": recall_score}


@pytest.mark.parametrize("name", ["iou", "dice", "precision", "recall"])
def test_binary_matches_sklearn_over_the_whole_set(name):
    rng = np.random.default_rng(0)
    truths = [rng.random((3, 8, 8)) > 0.7 for _ in range(4)]
    preds = [rng.random((3, 8, 8)) > 0.5 for _ in range(4)]
    truths, preds = [t.astype(np.int64) for t in truths], [p.astype(np.int64) for p in preds]
    got = accumulate(name, 2, preds, truths)[name]
    y_true = np.concatenate([t.ravel() for t in truths])
    y_pred = np.concatenate([p.ravel() for p in preds])
    assert got == pytest.approx(SKLEARN[name](y_true, y_pred))


@pytest.mark.parametrize("name", ["iou", "dice", "precision", "recall"])
def test_multiclass_per_class_and_mean_match_sklearn(name):
    rng = np.random.default_rng(1)
    truths = [rng.integers(0, 4, (2, 6, 6)) for _ in range(3)]
    preds = [np.where(rng.random((2, 6, 6)) > 0.4, t, rng.integers(0, 4, (2, 6, 6))) for t in truths]
    got = accumulate(name, 4, preds, truths)
    y_true = np.concatenate([t.ravel() for t in truths])
    y_pred = np.concatenate([p.ravel() for p in preds])
    per_class = SKLEARN[name](y_true, y_pred, average=None, labels=[0, 1, 2, 3])
    for k in range(4):
        assert got[f"{name}_c{k}"] == pytest.approx(per_class[k])
    assert got[name] == pytest.approx(per_class[1:].mean())  # background excluded by default
    with_bg = accumulate(name, 4, preds, truths, include_background=True)
    assert with_bg[name] == pytest.approx(per_class.mean())


def test_accuracy_matches_sklearn():
    rng = np.random.default_rng(2)
    truth, pred = rng.integers(0, 3, (4, 5, 5)), rng.integers(0, 3, (4, 5, 5))
    assert accumulate("accuracy", 3, [pred], [truth])["accuracy"] == pytest.approx(
        accuracy_score(truth.ravel(), pred.ravel()))


def test_whole_set_accumulation_is_not_a_mean_of_batch_ratios():
    # batch 1: a tiny object found; batch 2: a large object half found
    t1, p1 = np.zeros((1, 4, 4), np.int64), np.zeros((1, 4, 4), np.int64)
    t1[0, 0, 0] = p1[0, 0, 0] = 1
    t2, p2 = np.zeros((1, 4, 4), np.int64), np.zeros((1, 4, 4), np.int64)
    t2[0, :, :2] = 1
    p2[0, :, :1] = 1
    got = accumulate("iou", 2, [p1, p2], [t1, t2])["iou"]
    assert got == pytest.approx((1 + 4) / (1 + 8))          # global counts
    assert got != pytest.approx((1.0 + 0.5) / 2)              # what the seed blog's averaging would give


def test_empty_masks_convention():
    empty = np.zeros((2, 5, 5), np.int64)
    for name in ("iou", "dice", "precision", "recall"):
        assert accumulate(name, 2, [empty], [empty])[name] == 1.0  # nothing to find, nothing found
    full = np.ones((2, 5, 5), np.int64)
    assert accumulate("iou", 2, [empty], [full])["iou"] == 0.0     # all wrong
    assert accumulate("iou", 2, [full], [empty])["iou"] == 0.0
    assert accumulate("iou", 2, [full], [full])["iou"] == 1.0      # all correct
    # a class absent from truth and prediction is left out of the multi-class mean
    t = np.zeros((1, 4, 4), np.int64)
    t[0, :2] = 1
    got = accumulate("iou", 4, [t], [t])
    assert np.isnan(got["iou_c2"]) and got["iou"] == 1.0


def brute_hd95(a: np.ndarray, b: np.ndarray) -> float:
    """Independent HD95: boundaries by 4-neighbourhood, all pairwise distances."""
    def boundary(m):
        padded = np.pad(m, 1)
        inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        return np.argwhere(m & ~inner)
    pa, pb = boundary(a), boundary(b)
    d = cdist(pa, pb)
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


def test_hd95_matches_brute_force():
    from skimage.draw import disk, rectangle

    truth = np.zeros((40, 40), bool)
    pred = np.zeros((40, 40), bool)
    truth[disk((20, 20), 10)] = True
    rr, cc = rectangle((8, 12), end=(30, 33))
    pred[rr, cc] = True
    got = accumulate("hd95", 2, [pred[None].astype(np.int64)], [truth[None].astype(np.int64)])["hd95"]
    assert got == pytest.approx(brute_hd95(pred, truth))


def test_hd95_empty_cases():
    empty = np.zeros((1, 10, 10), np.int64)
    blob = empty.copy()
    blob[0, 3:6, 3:6] = 1
    assert accumulate("hd95", 2, [empty], [empty])["hd95"] == 0.0
    assert accumulate("hd95", 2, [empty], [blob])["hd95"] == pytest.approx(np.hypot(10, 10))
    assert accumulate("hd95", 2, [blob], [blob])["hd95"] == 0.0


def _one(name, k, logits, target, **params):
    m = metric(name, k, **params)
    m.update(torch.tensor(logits), torch.tensor(target))
    return m.compute()


def test_precision_recall_zero_over_zero_with_the_class_on_one_side_is_zero():
    # issue 14 item 1, its exact inputs: the class is in the truth but never predicted (precision 0/0),
    # or predicted but not in the truth (recall 0/0); only TP + FP + FN = 0 leaves a class out
    got = _one("precision", 2, [[[[-1.0, -1.0]]]], [[[1, 0]]])["precision"]
    assert got == 0.0 == precision_score([1, 0], [0, 0], zero_division=0)
    got = _one("recall", 2, [[[[1.0, -1.0]]]], [[[0, 0]]])["recall"]
    assert got == 0.0 == recall_score([0, 0], [1, 0], zero_division=0)
    onehot = torch.nn.functional.one_hot(torch.tensor([[[1, 1]]]), 3).permute(0, 3, 1, 2).double().tolist()
    got = _one("precision", 3, onehot, [[[1, 2]]])
    by_hand = (1 / 2 + 0.0) / 2  # class 1: 1 TP of 2 predicted; class 2: in the truth, never predicted
    assert got["precision"] == pytest.approx(0.25) == pytest.approx(by_hand)
    assert got["precision"] == pytest.approx(precision_score([1, 2], [1, 1], labels=[1, 2], average="macro",
                                                             zero_division=0))
    assert np.isnan(got["precision_c0"])  # background: absent on both sides, left out


def test_per_image_rows_are_each_metric_on_one_image():
    # issue 14 item 3: what compare pairs on; logits are the "images" and predict_fn is the identity,
    # so every row can be checked against scikit-learn and NumPy on that image alone
    from sklearn.metrics import f1_score

    from unetlab.tracking.per_image import evaluate_per_image

    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, (5, 1, 6, 6))
    masks = (rng.random((5, 6, 6)) > 0.6).astype(np.int64)
    masks[3] = 0
    logits[3] = -1.0  # nothing to find, nothing found
    dataset = [(torch.tensor(l), torch.tensor(m)) for l, m in zip(logits, masks)]
    train = {"metrics": [{"name": "iou"}, {"name": "dice"}], "loss": [{"name": "bce", "weight": 1.0}]}
    rows = evaluate_per_image(None, dataset, train, 2, unetlab.default_host().registry,
                              predict_fn=lambda images: images, batch_size=2)
    assert [r["image"] for r in rows] == [0, 1, 2, 3, 4]
    for row, l, m in zip(rows, logits, masks):
        pred = (l[0] > 0).astype(np.int64).ravel()
        assert row["val_iou"] == pytest.approx(jaccard_score(m.ravel(), pred, zero_division=1.0))
        assert row["val_dice"] == pytest.approx(f1_score(m.ravel(), pred, zero_division=1.0))
        p = 1 / (1 + np.exp(-l[0]))
        bce = -(m * np.log(p) + (1 - m) * np.log(1 - p)).mean()
        assert row["val_loss"] == pytest.approx(bce, rel=1e-6)  # float32 logits
    assert rows[3]["val_iou"] == 1.0


def test_uint8_masks_with_many_classes_count_like_int64_masks():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 20, 8, 8, generator=g)
    target = torch.randint(0, 20, (2, 8, 8), generator=g)
    wide, narrow = metric("iou", 20), metric("iou", 20)
    wide.update(logits, target)
    narrow.update(logits, target.to(torch.uint8))
    assert narrow.compute() == wide.compute()
