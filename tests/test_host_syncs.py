"""A training step must not make the GPU wait for the host: every first-party augmentation, loss (after a first
step that may make constants; the recorder sees the forward, autograd runs the backward in C++) and metric update
is run under ``record_host_syncs`` (on CPU) and, with a GPU, under PyTorch's own ``set_sync_debug_mode("error")``
(forward and backward). The recorder itself is checked on code that does sync."""

from __future__ import annotations

import pytest
import torch

import unetlab
from unetlab.training.host_sync import record_host_syncs


def first_party(kind: str) -> list[str]:
    """Every registered first-party component of ``kind``: a new one is checked here without editing this file."""
    return sorted(c.name for c in unetlab.default_host().registry
                  if c.kind == kind and c.plugin.startswith("unetlab_std."))


# what a component needs beyond its defaults here: a crop smaller than the batch, class weights (constants a loss
# makes on its first step)
PARAMS = {("augmentation", "crop"): {"size": 24}, ("loss", "bce"): {"pos_weight": 2.0},
          ("loss", "cross_entropy"): {"class_weights": [1.0, 2.0, 0.5]},
          ("loss", "dice"): {"class_weights": [1.0, 2.0, 0.5]}}
ONE_LOGIT = {"bce"}                     # losses of one sigmoid logit (binary)
HOST_BY_DESIGN = {("metric", "hd95")}   # runs SciPy on the host
AUGMENTATIONS = first_party("augmentation")
LOSSES = first_party("loss")
METRICS = [name for name in first_party("metric") if ("metric", name) not in HOST_BY_DESIGN]


def test_the_registry_gives_every_check_its_components():
    assert {"hflip", "crop"} <= set(AUGMENTATIONS) and {"bce", "cross_entropy"} <= set(LOSSES)
    assert {"iou", "dice"} <= set(METRICS)
    for kind, name in [*PARAMS, *HOST_BY_DESIGN, *(("loss", n) for n in ONE_LOGIT)]:  # no stale entry
        assert name in first_party(kind), (kind, name)


def batch(device, classes=3, ignore=None):
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=g, device=device)
    masks = torch.randint(0, classes, (4, 32, 32), generator=g, device=device)
    if ignore is not None:
        masks[:, :4] = ignore
    return images, masks, g


def test_the_recorder_finds_the_usual_host_syncs():
    x = torch.randn(8)
    with record_host_syncs() as found:
        x.sum().item()
        if x.max() > 0:
            pass
        x[x > 0]
        int(torch.randint(0, 4, (1,)))
        x.to("cpu")
        torch.tensor([1.0, 2.0], device=x.device)
        torch.nonzero(x)
        torch.where(x > 0)
        torch.nn.functional.one_hot(torch.arange(3))
        x.to("cpu:0")
        x.new_tensor([1.0])
    assert found == ["item", "__bool__", "__getitem__ with a boolean mask", "__int__", "to(cpu)",
                     "tensor(..., device=...)", "nonzero", "where(condition)", "one_hot without num_classes",
                     "to(cpu)", "new_tensor"]


def test_sync_free_code_records_nothing():
    x = torch.randn(8)
    with record_host_syncs() as found:
        torch.where(x > 0, x, torch.zeros_like(x)).sum()
        x.index_select(0, torch.arange(3)).to(torch.float64)
        torch.as_tensor(x, device=x.device)  # already a tensor: no host data
        torch.nn.functional.one_hot(torch.arange(3), 4)
    assert found == []


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_augmentations_make_no_host_sync(name):
    augment = unetlab.create("augmentation", name, **PARAMS.get(("augmentation", name), {}))
    images, masks, g = batch("cpu")
    with record_host_syncs() as found:
        augment(images, masks, g)
    assert found == []


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("ignore", [None, 2])
def test_losses_forward_and_backward_make_no_host_sync(name, ignore):
    classes = 2 if name in ONE_LOGIT else 3
    loss = unetlab.create("loss", name, num_classes=classes, ignore_index=ignore, **PARAMS.get(("loss", name), {}))
    _, masks, g = batch("cpu", classes, ignore=None if ignore is None else 255)
    if ignore is not None:
        masks = torch.where(masks == 255, torch.full_like(masks, ignore), masks)
    logits = torch.randn(4, 1 if name in ONE_LOGIT else classes, 32, 32, generator=g, requires_grad=True)
    loss(logits, masks).backward()  # the first step may make its constants (class weights) once
    with record_host_syncs() as found:
        loss(logits, masks).backward()
    assert found == []
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", METRICS)
def test_metric_updates_make_no_host_sync(name):
    metric = unetlab.create("metric", name, num_classes=3, ignore_index=255)
    _, masks, g = batch("cpu", 3, ignore=255)
    logits = torch.randn(4, 3, 32, 32, generator=g)
    with record_host_syncs() as found:
        for _ in range(3):
            metric.update(logits, masks)
    assert found == []
    assert metric.compute()  # reading the result afterwards is the one allowed copy


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_components_make_no_cuda_sync_on_a_gpu():
    images, masks, g = batch("cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name in AUGMENTATIONS:
            unetlab.create("augmentation", name, **PARAMS.get(("augmentation", name), {}))(images, masks, g)
        for name in LOSSES:
            classes = 2 if name in ONE_LOGIT else 3
            logits = torch.randn(4, 1 if name in ONE_LOGIT else classes, 32, 32, device="cuda", requires_grad=True)
            loss = unetlab.create("loss", name, num_classes=classes, **PARAMS.get(("loss", name), {}))
            torch.cuda.set_sync_debug_mode("default")
            loss(logits, masks % classes).backward()  # the first step makes its constants once
            torch.cuda.set_sync_debug_mode("error")
            loss(logits, masks % classes).backward()
        for name in METRICS:
            unetlab.create("metric", name, num_classes=3).update(torch.randn(4, 3, 32, 32, device="cuda"), masks)
    finally:
        torch.cuda.set_sync_debug_mode("default")
