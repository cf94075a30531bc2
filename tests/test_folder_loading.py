"""Patch batches are the same numbers however they are loaded (issue 19, item 6): DataLoader workers hand
over raw windows that are finished (normalised) per batch; each value must equal what the window
normalised alone by ``apply_normalization`` gives, padding included, with 0 and with 2 workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import unetlab
from unetlab.data.options import configure_source
from unetlab.data.patches import finish_batch, zero_outside_masked
from unetlab.data.sources import make_loader


def write_set(root: Path, kind: str) -> None:
    """Images of several sizes, some smaller than the patch (padded); masks with foreground."""
    rng = np.random.default_rng(2)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (h, w) in enumerate([(40, 52), (12, 30), (33, 20), (64, 48), (20, 20)]):
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4:h // 2, w // 4:w // 2] = 255
        if kind == "rgb8":
            Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / "images" / f"a{i}.png")
        elif kind == "grey16":
            tifffile.imwrite(root / "images" / f"a{i}.tif", (rng.random((h, w)) * 4095).astype(np.uint16))
        else:  # float32, two channels
            tifffile.imwrite(root / "images" / f"a{i}.tif", rng.normal(3, 2, (h, w, 2)).astype(np.float32),
                             photometric="minisblack", planarconfig="contig")
        Image.fromarray(mask).save(root / "masks" / f"a{i}.png")


CASES = [("rgb8", None), ("grey16", None), ("rgb8", {"mode": "zscore"}),
         ("grey16", {"mode": "percentile", "lower": 2, "upper": 98}), ("float2", {"mode": "zscore"}),
         ("grey16", {"mode": "zscore", "scope": "image"})]


def patches(root: Path, normalize: dict | None, cache: str):
    source = unetlab.create("dataset", "folder", root=str(root), val_fraction=0.0, cache=cache)
    configure_source(source, {"patch_size": [24, 24], "foreground_oversample": 0.5, "normalize": normalize},
                     "folder")
    return source.split("train")


def reference(dataset, key) -> tuple[torch.Tensor, torch.Tensor]:
    """The window of item ``key``, normalised alone by ``SampleStore.read`` (``apply_normalization``)."""
    from unetlab.data.patches import patch_origin

    index, seed = key
    rng = np.random.default_rng(seed)
    centre = None
    points = dataset.store.foreground[index]
    if rng.random() < dataset.oversample and len(points):
        centre = tuple(points[rng.integers(len(points))])
    top, left = patch_origin(dataset.store.shape(index), dataset.size, rng, centre)
    return dataset.store.read(index, top, left, dataset.size)


@pytest.mark.parametrize("kind, normalize", CASES)
@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_finished_patches_equal_windows_normalised_alone(tmp_path, monkeypatch, kind, normalize, cache):
    monkeypatch.setenv("UNETLAB_CACHE_DIR", str(tmp_path / "cache"))
    write_set(tmp_path / "data", kind)
    dataset = patches(tmp_path / "data", normalize, cache)
    padded = 0
    for seed in range(12):
        for index in range(len(dataset)):
            image, mask = dataset[(index, seed)]
            expected_image, expected_mask = reference(dataset, (index, seed))
            assert image.dtype == torch.float32 and mask.dtype == torch.int64
            assert torch.equal(image, expected_image) and torch.equal(mask, expected_mask), (index, seed)
            padded += int((mask == 255).any())
    assert padded  # padding was exercised (images smaller than the patch)
    loader = make_loader(dataset, 4, True, 0, False)
    loader.epoch_sampler.set_epoch(3)
    keys = list(loader.epoch_sampler)
    batches = list(loader)
    images = torch.cat([b[0] for b in batches])
    masks = torch.cat([b[1] for b in batches])
    for k, key in enumerate(keys):
        expected_image, expected_mask = reference(dataset, key)
        assert torch.equal(images[k], expected_image) and torch.equal(masks[k], expected_mask)


def test_padding_on_a_device_needs_no_host_copy_and_matches():
    """The masked padding used on a GPU (no host sync) equals the per-image slices used on the host."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(6, 2, 9, 11)).astype(np.float32))
    valid = torch.tensor([[0, 9, 0, 11], [2, 9, 0, 11], [0, 5, 3, 8], [1, 2, 0, 1], [0, 9, 4, 11], [3, 7, 2, 10]])
    norms = np.zeros((6, 4, 2), np.float32)
    norms[:, 1], norms[:, 2], norms[:, 3] = 1.0, -np.inf, np.inf
    on_host, _ = finish_batch(x.clone(), torch.zeros(6, 9, 11, dtype=torch.uint8), norms, valid.numpy())
    assert torch.equal(zero_outside_masked(x.clone(), valid), on_host)
    assert torch.equal(on_host[1, :, :2], torch.zeros(2, 2, 11)) and torch.equal(on_host[0], x[0])


@pytest.mark.slow
def test_two_workers_give_the_batches_of_none(tmp_path, monkeypatch):
    monkeypatch.setenv("UNETLAB_CACHE_DIR", str(tmp_path / "cache"))
    write_set(tmp_path / "data", "grey16")
    dataset = patches(tmp_path / "data", {"mode": "zscore"}, "disk")
    runs = []
    for workers in (0, 2):
        loader = make_loader(dataset, 2, True, workers, False)
        epochs = []
        for epoch in (5, 6):  # persistent workers: the second epoch reuses them
            loader.epoch_sampler.set_epoch(epoch)
            epochs.append([(i.clone(), m.clone()) for i, m in loader])
        runs.append(epochs)
    for zero, two in zip(*runs):
        assert len(zero) == len(two) == 3
        for (a, b), (c, d) in zip(zero, two):
            assert torch.equal(a, c) and torch.equal(b, d)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_raw_patches_finished_on_the_gpu_equal_the_host_batches(tmp_path, monkeypatch):
    """CudaPrefetcher copies the raw (smaller) batches and finishes them on the GPU: same numbers."""
    from unetlab.data.sources import CudaPrefetcher

    monkeypatch.setenv("UNETLAB_CACHE_DIR", str(tmp_path / "cache"))
    write_set(tmp_path / "data", "rgb8")
    dataset = patches(tmp_path / "data", {"mode": "zscore"}, "disk")
    host = make_loader(dataset, 2, True, 0, False)
    device = CudaPrefetcher(make_loader(dataset, 2, True, 0, True), torch.device("cuda"))
    for loader in (host, device):
        loader.epoch_sampler.set_epoch(4)
    for (a, b), (c, d) in zip(host, device, strict=True):
        assert c.is_cuda and torch.equal(c.cpu(), a) and torch.equal(d.cpu(), b)


@pytest.mark.slow
def test_a_run_on_patches_gives_the_same_metrics_with_0_and_2_workers(tmp_path, monkeypatch, capsys):
    """Through the CLI: workers change where patches are read, never the numbers."""
    from test_folder_location import EXPERIMENT, train, write_dataset

    monkeypatch.setenv("UNETLAB_CACHE_DIR", str(tmp_path / "cache"))
    results = []
    for workers in (0, 2):
        folder = tmp_path / f"w{workers}"
        write_dataset(folder / "data")
        (folder / "exp.yaml").write_text(EXPERIMENT.replace("  batch_size: 2\n",
                                                            f"  batch_size: 2\n  num_workers: {workers}\n"))
        results.append(train(folder, monkeypatch, capsys))
    assert results[0]["metrics"] == results[1]["metrics"] and results[0]["per_image"] == results[1]["per_image"]
