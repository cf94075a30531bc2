"""Datasets (determinism, modes, cache, folder errors via the CLI) and augmentation alignment."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from skimage import io

import unetlab
from unetlab.cli.main import main


def source(name, **params):
    return unetlab.create("dataset", name, **params)


def arrays(src, split="train"):
    images, masks = src.split(split).tensors
    return images.numpy(), masks.numpy()


@pytest.mark.parametrize("name", ["shapes", "blobs"])
def test_generated_datasets_are_deterministic_and_well_formed(name, tmp_path, monkeypatch):
    a = arrays(source(name, seed=1, image_size=32, n_train=6, n_val=2))
    monkeypatch.setenv("UNETLAB_CACHE_DIR", str(tmp_path / "elsewhere"))  # regenerate from scratch
    b = arrays(source(name, seed=1, image_size=32, n_train=6, n_val=2))
    c = arrays(source(name, seed=2, image_size=32, n_train=6, n_val=2))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    images, masks = a
    channels = 3 if name == "shapes" else 1
    assert images.shape == (6, channels, 32, 32) and images.dtype == np.float32
    assert masks.shape == (6, 32, 32) and masks.dtype == np.int64
    assert set(np.unique(masks)) <= {0, 1} and masks.any() and (masks == 0).any()
    assert np.isfinite(images).all() and -2 < images.min() and images.max() < 3
    val = arrays(source(name, seed=1, image_size=32, n_train=6, n_val=2), "val")
    assert val[0].shape[0] == 2 and not np.array_equal(val[0][0], images[0])  # a different split


def test_shapes_modes():
    multi = source("shapes", mode="multiclass", image_size=48, n_train=20, n_val=1, max_shapes=5)
    assert multi.num_classes == 5
    _, masks = arrays(multi)
    assert set(np.unique(masks)) <= set(range(5)) and len(np.unique(masks)) >= 4
    target = source("shapes", mode="target", target_shape="circle", image_size=48, n_train=20, n_val=1, max_shapes=5)
    binary = source("shapes", mode="binary", image_size=48, n_train=20, n_val=1, max_shapes=5)
    # same seed, same scenes: the target mask is exactly the circles of the multi-class mask
    np.testing.assert_array_equal(arrays(target)[1], (masks == 1).astype(np.int64))
    np.testing.assert_array_equal(arrays(binary)[1], (masks > 0).astype(np.int64))


def test_generated_data_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("UNETLAB_CACHE_DIR", str(tmp_path))
    arrays(source("blobs", image_size=32, n_train=4, n_val=2))
    files = sorted((tmp_path / "datasets").glob("*.npz"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = arrays(source("blobs", image_size=32, n_train=4, n_val=2))  # a new source: read, not regenerated
    assert files[0].stat().st_mtime_ns == stamp
    assert again[0].shape == (4, 1, 32, 32)


def write_folder(root, pairs, size=(16, 16), rgb=False):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in pairs:
        shape = (*size, 3) if rgb else size
        io.imsave(root / "images" / f"{name}.png", (rng.random(shape) * 255).astype(np.uint8), check_contrast=False)
        mask = np.zeros(size, np.uint8)
        mask[4:10, 4:10] = 255
        io.imsave(root / "masks" / f"{name}.png", mask, check_contrast=False)


def test_folder_class_values_map_masks(tmp_path):
    root = tmp_path / "data"
    write_folder(root, ["a", "b"])
    weird = np.zeros((16, 16), np.uint8)
    weird[:8] = 7
    io.imsave(root / "masks" / "a.png", weird, check_contrast=False)
    src = source("folder", root=str(root), class_values=[0, 7, 255], val_fraction=0.0)
    assert src.num_classes == 3
    masks = arrays(src)[1]
    assert set(np.unique(masks)) == {0, 1, 2}
    # 255 not among class_values is the ignore value (VOC); another unlisted value is an error
    ignored = arrays(source("folder", root=str(root), class_values=[0, 7], val_fraction=0.0))[1]
    assert set(np.unique(ignored)) == {0, 1, 255}
    weird[0, 0] = 9
    io.imsave(root / "masks" / "a.png", weird, check_contrast=False)
    with pytest.raises(unetlab.UnetlabError, match=r"unexpected mask value\(s\) \[9\] \(e.g. in '.*a.png'\)"):
        source("folder", root=str(root), class_values=[0, 7], val_fraction=0.0).split("train")


def test_folder_dataset_reads_pairs_and_splits(tmp_path):
    write_folder(tmp_path / "data", [f"img{i}" for i in range(10)], rgb=True)
    src = source("folder", root=str(tmp_path / "data"), val_fraction=0.2, seed=0)
    assert (src.in_channels, src.num_classes, src.image_size) == (3, 2, (16, 16))
    images, masks = arrays(src)
    assert images.shape == (8, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert set(np.unique(masks)) == {0, 1}
    assert len(src.split("val")) == 2
    gray = source("folder", root=str(tmp_path / "data"), grayscale=True)
    assert gray.in_channels == 1 and arrays(gray)[0].shape[1] == 1


FOLDER_EXPERIMENT = """
data: {{dataset: {{name: folder, root: {root}}}, batch_size: 2}}
model: {{encoder: {{name: classic, depth: 2, base_channels: 4}}}}
train: {{epochs: 1}}
tracking: {{uri: sqlite:///{store}}}
"""


def run_folder(tmp_path, root, capsys):
    """``unetlab run`` in this process (no interpreter start per case): exit 2, one error line, no store."""
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(FOLDER_EXPERIMENT.format(root=root, store=tmp_path / "mlflow.db")))
    code = main(["run", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("unetlab: error: "), (code, err)
    assert not (tmp_path / "mlflow.db").exists()  # nothing half-written
    return err[0]


def test_folder_errors_via_cli(tmp_path, capsys):
    root = tmp_path / "data"
    write_folder(root, ["a", "b", "c"])
    (root / "masks" / "b.png").unlink()
    io.imsave(root / "masks" / "zz.png", np.zeros((16, 16), np.uint8), check_contrast=False)
    line = run_folder(tmp_path, root, capsys)
    assert "images without a mask" in line and "b" in line and "masks without an image" in line and "zz" in line

    root = tmp_path / "data2"
    write_folder(root, ["a", "b"])
    io.imsave(root / "masks" / "b.png", np.zeros((12, 16), np.uint8), check_contrast=False)
    assert "size mismatch" in run_folder(tmp_path, root, capsys)

    root = tmp_path / "data3"
    write_folder(root, ["a", "b"])
    bad = np.zeros((16, 16), np.uint8)
    bad[0, 0] = 7
    io.imsave(root / "masks" / "a.png", bad, check_contrast=False)
    line = run_folder(tmp_path, root, capsys)
    assert "unexpected mask value(s) [7]" in line and "a.png" in line and "class_values" in line

    root = tmp_path / "data4"
    write_folder(root, ["a", "b"])
    (root / "images" / "b.png").write_bytes(b"not a png")
    line = run_folder(tmp_path, root, capsys)
    assert "cannot read" in line and "b.png" in line

    root = tmp_path / "data5"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    assert "holds no images" in run_folder(tmp_path, root, capsys)

    assert "is not a directory" in run_folder(tmp_path, tmp_path / "missing", capsys)


# --- augmentation ---------------------------------------------------------------------------------------

def mask_batch(seed=0, n=4, size=32):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):  # asymmetric blobs, so any flip or rotation changes them
        y, x = torch.randint(2, size - 12, (2,), generator=g).tolist()
        masks[i, y:y + 10, x:x + 5] = 1
        masks[i, y:y + 3, x:x + 10] = 1
    return masks


@pytest.mark.parametrize("name, params, exact", [
    ("hflip", {"p": 1.0}, True), ("vflip", {"p": 1.0}, True), ("rot90", {"p": 1.0}, True),
    ("crop", {"size": 20}, True), ("affine", {"p": 1.0, "degrees": 30.0}, False),
    ("elastic", {"p": 1.0, "alpha": 3.0, "sigma": 4.0}, False),
])
def test_geometric_augmentations_keep_image_and_mask_aligned(name, params, exact):
    masks = mask_batch()
    images = masks[:, None].float().repeat(1, 2, 1, 1)  # the image *is* the mask: alignment is checkable
    augment = unetlab.create("augmentation", name, **params)
    out_images, out_masks = augment(images, masks, torch.Generator().manual_seed(3))
    assert out_images.shape[-2:] == out_masks.shape[-2:] and out_masks.dtype == torch.long
    assert not torch.equal(out_masks, masks[..., :out_masks.shape[-2], :out_masks.shape[-1]])  # it did something
    agree = ((out_images[:, 0] > 0.5).long() == out_masks).float().mean().item()
    assert agree == 1.0 if exact else agree > 0.97
    assert set(out_masks.unique().tolist()) <= {0, 1}  # classes never blend


def test_a_misaligned_transform_would_be_caught():
    masks = mask_batch()
    images = masks[:, None].float()
    flipped_image_only = images.flip(-1)
    agree = ((flipped_image_only[:, 0] > 0.5).long() == masks).float().mean().item()
    assert agree < 0.97  # the alignment check above is not vacuous


def test_photometric_augmentation_leaves_masks_and_is_seeded():
    masks = mask_batch()
    images = torch.rand(4, 3, 32, 32)
    augment = unetlab.create("augmentation", "brightness_contrast", p=1.0)
    a = augment(images, masks, torch.Generator().manual_seed(5))
    b = augment(images, masks, torch.Generator().manual_seed(5))
    assert torch.equal(a[1], masks) and torch.equal(a[0], b[0]) and not torch.equal(a[0], images)
