"""Every loss against an independent NumPy computation, gradients by gradcheck, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import unetlab

# every registered first-party loss: the properties below hold for any loss, so a new one is tested without editing
LOSSES = sorted(c.name for c in unetlab.default_host().registry
                if c.kind == "loss" and c.plugin.startswith("unetlab_std."))
NOT_SMOOTH = {"lovasz"}  # piecewise linear in the sorted errors: gradcheck's finite differences cross its kinks


def test_the_registry_lists_the_losses_these_tests_run_over():
    assert {"bce", "cross_entropy", "dice", "lovasz"} <= set(LOSSES) and NOT_SMOOTH <= set(LOSSES)


def loss(name, num_classes=2, **params):
    return unetlab.create("loss", name, num_classes=num_classes, **params)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def binary_case(seed=0, n=2, size=6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 1, size, size, generator=g, dtype=torch.float64) * 2
    target = (torch.rand(n, size, size, generator=g) > 0.6).long()
    return logits, target


def multi_case(seed=0, n=2, k=4, size=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, size, size, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, k, (n, size, size), generator=g)
    return logits, target


def region_reference(probs, onehot, alpha, beta, smooth):
    tp = (probs * onehot).sum(axis=(0, 2, 3))
    fp = (probs * (1 - onehot)).sum(axis=(0, 2, 3))
    fn = ((1 - probs) * onehot).sum(axis=(0, 2, 3))
    return 1 - ((tp + smooth) / (tp + alpha * fp + beta * fn + smooth)).mean()


def onehot_np(target, k):
    return np.eye(k)[target].transpose(0, 3, 1, 2)


def test_bce_matches_numpy():
    logits, target = binary_case()
    p, y = sigmoid(logits.numpy()[:, 0]), target.numpy()
    expected = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    assert loss("bce")(logits, target).item() == pytest.approx(expected, rel=1e-10)


def test_cross_entropy_matches_numpy_with_class_weights():
    logits, target = multi_case()
    w = np.array([0.5, 1.0, 2.0, 1.5])
    logp = np.log(softmax(logits.numpy()))
    picked = np.take_along_axis(logp, target.numpy()[:, None], axis=1)[:, 0]
    weights = w[target.numpy()]
    expected = -(weights * picked).sum() / weights.sum()
    got = loss("cross_entropy", 4, class_weights=list(w))(logits, target).item()
    assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("name, alpha, beta", [("dice", 0.5, 0.5), ("iou", 1.0, 1.0), ("tversky", 0.3, 0.7)])
def test_region_losses_binary_and_multiclass(name, alpha, beta):
    params = {"alpha": alpha, "beta": beta} if name == "tversky" else {}
    logits, target = binary_case()
    expected = region_reference(sigmoid(logits.numpy()), (target.numpy() == 1)[:, None].astype(float), alpha, beta, 1.0)
    assert loss(name, **params)(logits, target).item() == pytest.approx(expected, rel=1e-10)
    logits, target = multi_case()
    expected = region_reference(softmax(logits.numpy()), onehot_np(target.numpy(), 4), alpha, beta, 1.0)
    assert loss(name, 4, **params)(logits, target).item() == pytest.approx(expected, rel=1e-10)


def test_bce_iou_is_the_seed_blogs_formula():
    logits, target = binary_case(3)
    p, y = sigmoid(logits.numpy()).reshape(-1), target.numpy().reshape(-1).astype(float)
    # the blog: iou = (sum(p*y) + 1e-7) / (sum(p + y) - intersection + 1e-7); loss = BCE - iou + 1
    intersection = (p * y).sum() + 1e-7
    iou = intersection / ((p + y).sum() - intersection + 1e-7)
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    assert loss("bce_iou")(logits, target).item() == pytest.approx(bce - iou + 1, rel=1e-9)


def test_focal_matches_numpy_and_reduces_to_cross_entropy():
    logits, target = binary_case(4)
    p, y = sigmoid(logits.numpy()[:, 0]), target.numpy()
    pt = np.where(y == 1, p, 1 - p)
    at = np.where(y == 1, 0.25, 0.75)
    expected = (-at * (1 - pt) ** 2 * np.log(pt)).mean()
    assert loss("focal")(logits, target).item() == pytest.approx(expected, rel=1e-10)
    logits, target = multi_case(5)
    ce = loss("cross_entropy", 4)(logits, target).item()
    assert loss("focal", 4, gamma=0.0, alpha=None)(logits, target).item() == pytest.approx(ce, rel=1e-10)


def test_lovasz_binary_hinge_equals_jaccard_loss_on_hard_errors():
    # With hinge errors of exactly 0 (correct, margin 1) or 1 (logit 0), the Lovasz extension equals
    # the Jaccard loss of the mispredicted set: (FN + FP) / (|truth| + FP).
    target = torch.tensor([[[1, 1, 0, 0], [1, 0, 0, 1]]])
    wrong = torch.tensor([[[1, 0, 0, 1], [0, 0, 1, 0]]], dtype=torch.bool)  # pixels given logit 0
    logits = torch.where(wrong, torch.zeros(()), (2 * target - 1).double())[:, None]
    fn = (wrong & (target == 1)).sum().item()
    fp = (wrong & (target == 0)).sum().item()
    expected = (fn + fp) / ((target == 1).sum().item() + fp)
    assert loss("lovasz")(logits, target).item() == pytest.approx(expected)


def test_lovasz_softmax_equals_mean_jaccard_loss_for_hard_predictions():
    logits, target = multi_case(6)
    hard = logits.argmax(1)
    probs_one_hot = torch.nn.functional.one_hot(hard, 4).permute(0, 3, 1, 2).double() * 200 - 100
    expected = []
    for c in range(4):
        t, p = (target == c).numpy(), (hard == c).numpy()
        if t.any():
            expected.append(1 - (t & p).sum() / (t | p).sum())
    assert loss("lovasz", 4)(probs_one_hot, target).item() == pytest.approx(np.mean(expected), rel=1e-6)


@pytest.mark.parametrize("name", [name for name in LOSSES if name not in NOT_SMOOTH])
@pytest.mark.parametrize("classes", [1, 3])
def test_gradients_are_correct(name, classes):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, classes, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, max(classes, 2), (2, 4, 4), generator=g)
    fn = loss(name, max(classes, 2))
    assert torch.autograd.gradcheck(lambda x: fn(x, target), (logits,))


@pytest.mark.parametrize("name", LOSSES)
def test_ignore_index_pixels_count_nowhere(name):
    logits, target = multi_case(7, k=3)
    ignored = target.clone()
    ignored[:, :2] = 255
    changed_logits = logits.clone()
    changed_logits[:, :, :2] = 50.0  # whatever the model says there must not matter
    fn = loss(name, 3, ignore_index=255)
    assert fn(logits, ignored).item() == pytest.approx(fn(changed_logits, ignored).item(), rel=1e-9)


@pytest.mark.parametrize("classes", [1, 4])
def test_lovasz_with_ignored_pixels_equals_lovasz_on_the_valid_pixels_alone(classes):
    # Ignored pixels are kept in place (no boolean mask: no GPU sync) yet must count nowhere: the loss equals
    # that of a batch holding only the valid pixels, with a class absent from them (class 3).
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, classes, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3 if classes > 1 else 2, (2, 6, 6), generator=g)
    target[:, :2] = 255
    valid = target != 255
    kept_logits = logits.permute(1, 0, 2, 3)[:, valid].reshape(1, classes, 1, -1)
    kept_target = target[valid].reshape(1, 1, -1)
    expected = loss("lovasz", max(classes, 2))(kept_logits, kept_target)
    got = loss("lovasz", max(classes, 2), ignore_index=255)(logits, target)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    (grad,) = torch.autograd.grad(got, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert torch.allclose(grad, expected_grad, atol=1e-12) and (grad[:, :, :2] == 0).all()


def test_perfect_and_empty_predictions():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 1:3, 1:3] = 1
    perfect = (target[:, None].double() * 2 - 1) * 30
    assert loss("dice", smooth=0.0)(perfect, target).item() == pytest.approx(0.0, abs=1e-9)
    assert loss("lovasz")(perfect, target).item() == pytest.approx(0.0, abs=1e-9)
    empty = torch.zeros(1, 4, 4, dtype=torch.long)
    all_background = torch.full((1, 1, 4, 4), -30.0, dtype=torch.float64)
    assert loss("dice")(all_background, empty).item() == pytest.approx(0, abs=1e-9)
    assert torch.isfinite(loss("iou")(torch.zeros(1, 1, 4, 4), empty))


def test_half_precision_logits_give_float32_loss():
    logits, target = binary_case()
    out = loss("bce_iou")(logits.to(torch.bfloat16), target)
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_combined_loss_list_weights(tmp_path):
    from unetlab.training.trainer import build_loss

    path = tmp_path / "e.yaml"
    path.write_text("train: {loss: [{name: bce, weight: 0.25}, {name: dice, weight: 0.75}]}\n")
    train = unetlab.load_experiment(path).runs[0].config["train"]
    combined = build_loss(train, 2, unetlab.default_host().registry)
    logits, target = binary_case()
    expected = 0.25 * loss("bce")(logits, target) + 0.75 * loss("dice")(logits, target)
    assert combined(logits, target).item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("name", ["cross_entropy", "bce_iou"])
def test_every_pixel_ignored_gives_zero_loss_and_finite_gradient(name):
    # issue 14 item 1: F.cross_entropy's mean is 0/0 = NaN here, which failed the run as a non-finite loss
    logits, _ = multi_case(5)
    logits.requires_grad_(True)
    target = torch.full((2, 5, 5), 255)
    value = loss(name, 4, ignore_index=255)(logits, target)
    value.backward()
    assert value.item() == 0.0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_with_ignored_pixels_matches_pytorch(smoothing):
    logits, target = multi_case(6)
    target[0, :2] = 255
    w = [0.5, 1.0, 2.0, 1.5]
    expected = torch.nn.functional.cross_entropy(logits, target, weight=torch.tensor(w, dtype=torch.float64),
                                                 ignore_index=255, label_smoothing=smoothing)
    got = loss("cross_entropy", 4, class_weights=w, ignore_index=255, label_smoothing=smoothing)(logits, target)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)


def test_class_weights_first_used_under_inference_mode_still_train():
    # the weight tensor is made once per device and kept: made under inference mode (a validation sanity check
    # before training), it must still be usable in a loss that is differentiated afterwards
    fn = loss("cross_entropy", 3, class_weights=[1.0, 2.0, 0.5])
    logits, target = multi_case(8, k=3)
    with torch.inference_mode():
        fn(logits.float(), target)
    trainable = logits.float().requires_grad_()
    fn(trainable, target).backward()
    assert torch.isfinite(trainable.grad).all()
