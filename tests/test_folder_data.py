"""Folder data at real sizes: patches, resize, normalisation, formats, splits, folds, the decode cache,
``unetlab data``."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from scipy.stats import binomtest

import unetlab
from unetlab.cli.main import main as cli_main
from unetlab.config.experiment import load_experiment
from unetlab.data.options import configure_source
from unetlab.data.patches import IGNORE_INDEX


def folder(root: Path, data: dict | None = None, **params):
    """A configured folder source, as ``unetlab run`` builds it."""
    source = unetlab.create("dataset", "folder", root=str(root), **params)
    configure_source(source, data or {}, "folder")
    return source


def write_pair(root: Path, stem: str, image: np.ndarray, mask: np.ndarray, suffix: str = ".png",
               mask_name: str | None = None) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    if suffix in (".tif", ".tiff"):
        tifffile.imwrite(root / "images" / f"{stem}{suffix}", image)
    else:
        Image.fromarray(image).save(root / "images" / f"{stem}{suffix}")
    Image.fromarray(mask).save(root / "masks" / f"{mask_name or stem}.png")


def mixed_sizes(root: Path, n: int = 6) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = [(24, 24), (40, 52), (20, 36)][i % 3]
        mask = np.zeros((h, w), np.uint8)
        mask[4:12, 6:14] = 255
        write_pair(root, f"s{i}", (rng.random((h, w, 3)) * 255).astype(np.uint8), mask)


# --- patches and padding ----------------------------------------------------------------------------

def test_patches_cover_the_image_and_pad_with_the_ignore_value(tmp_path):
    h, w = 30, 45
    position = (np.arange(h)[:, None] * w + np.arange(w)[None]).astype(np.uint16)  # each pixel names itself
    write_pair(tmp_path, "a", position, np.zeros((h, w), np.uint8), suffix=".tif")
    train = folder(tmp_path, {"patch_size": [16, 16], "foreground_oversample": 0.0}, val_fraction=0.0).split("train")
    origins = set()
    for seed in range(400):
        image, mask = train[(0, seed)]
        assert image.shape == (1, 16, 16) and mask.shape == (16, 16) and (mask == 0).all()
        ids = np.rint(image[0].numpy() * 65535).astype(int)
        assert (np.diff(ids, axis=1) == 1).all() and (np.diff(ids, axis=0) == w).all()  # a true window
        origins.add(divmod(int(ids[0, 0]), w))
    # every row and every column offset is drawn, so every pixel can be: the sampling covers the image
    assert {t for t, _ in origins} == set(range(h - 16 + 1)) and {x for _, x in origins} == set(range(w - 16 + 1))
    assert torch.equal(train[(0, 7)][0], train[(0, 7)][0])  # the seed fixes the patch

    small = folder(tmp_path, {"patch_size": [40, 64]}, val_fraction=0.0).split("train")
    image, mask = small[(0, 3)]
    assert image.shape == (1, 40, 64)
    assert (mask == IGNORE_INDEX).sum() == 40 * 64 - h * w  # exactly the padding is ignored
    assert (image[0][mask == IGNORE_INDEX] == 0).all()


def test_foreground_oversampling_share_within_binomial_noise(tmp_path):
    size, patch, oversample, n = 64, 16, 0.33, 600
    mask = np.zeros((size, size), np.uint8)
    mask[50, 55] = 1  # one foreground pixel
    write_pair(tmp_path, "a", np.zeros((size, size), np.uint8), mask)
    train = folder(tmp_path, {"patch_size": [patch, patch], "foreground_oversample": oversample},
                   val_fraction=0.0).split("train")
    hits = sum(int((train[(0, seed)][1] == 1).any()) for seed in range(n))
    # a uniform patch holds the pixel when its origin is within `patch` rows/columns before it
    origins = size - patch + 1
    p_random = (len([t for t in range(origins) if t <= 50 < t + patch]) / origins) * \
               (len([t for t in range(origins) if t <= 55 < t + patch]) / origins)
    expected = oversample + (1 - oversample) * p_random
    assert binomtest(hits, n, expected).pvalue > 1e-3, (hits, n, expected)
    assert binomtest(hits, n, p_random).pvalue < 1e-6  # the check can fail: without oversampling it would


def test_validation_tiles_count_every_pixel_once(tmp_path):
    mixed_sizes(tmp_path, 4)
    src = folder(tmp_path, {"patch_size": [16, 16]}, val_fraction=0.5)
    tiles, whole = src.split("val"), src.whole_images("val")
    shapes = [m.shape for _, m in whole]
    assert len(tiles) == sum(-(-h // 16) * -(-w // 16) for h, w in shapes)
    assert sum(int((tiles[i][1] != IGNORE_INDEX).sum()) for i in range(len(tiles))) == sum(h * w for h, w in shapes)
    assert sum(int((tiles[i][1] == 1).sum()) for i in range(len(tiles))) == sum(int(m.sum()) for _, m in whole)


def test_padding_is_ignored_by_losses_and_metrics(tmp_path):
    image = np.full((10, 12), 200, np.uint8)
    mask = np.zeros((10, 12), np.uint8)
    mask[2:6, 3:9] = 255
    write_pair(tmp_path, "a", image, mask)
    _, target = folder(tmp_path, {"patch_size": [16, 16]}, val_fraction=0.0).split("train")[(0, 1)]
    logits = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    valid = target != IGNORE_INDEX
    assert valid.sum() == 120
    loss = unetlab.create("loss", "bce", num_classes=2, ignore_index=IGNORE_INDEX)(logits, target[None])
    reference = torch.nn.functional.binary_cross_entropy_with_logits(logits[0, 0][valid], target[valid].float())
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    metric = unetlab.create("metric", "iou", num_classes=2)
    metric.update(logits, target[None])
    pred, truth = (logits[0, 0] > 0)[valid], target[valid] == 1
    expected = (pred & truth).sum().item() / (pred | truth).sum().item()
    assert metric.compute()["iou"] == pytest.approx(expected)


def test_the_trainer_gives_losses_and_metrics_the_dataset_ignore_index():
    from unetlab.plugin_api.host import default_host
    from unetlab.training.trainer import build_loss, build_metrics

    registry = default_host().registry
    train = {"loss": [{"name": "cross_entropy", "weight": 1.0, "class_weights": None, "ignore_index": None,
                       "label_smoothing": 0.0}],
             "metrics": [{"name": "accuracy", "ignore_index": None}]}
    logits = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 3, (2, 8, 8), generator=torch.Generator().manual_seed(2))
    target[:, :3] = IGNORE_INDEX
    valid = target != IGNORE_INDEX
    loss = build_loss(train, 3, registry, ignore_index=IGNORE_INDEX)(logits, target)
    reference = torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[valid], target[valid])
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    with pytest.raises(IndexError):  # without it, 255 is an out-of-range class: the wiring matters
        build_loss(train, 3, registry)(logits, target)
    (accuracy,) = build_metrics(train, 3, registry, ignore_index=IGNORE_INDEX)
    accuracy.update(logits, target)
    expected = (logits.argmax(1)[valid] == target[valid]).float().mean().item()
    assert accuracy.compute()["accuracy"] == pytest.approx(expected)


# --- resize and same-size sets -----------------------------------------------------------------------

def test_sizes_that_differ_need_patches_or_resize(tmp_path):
    mixed_sizes(tmp_path)
    with pytest.raises(unetlab.UnetlabError, match=r"images differ in size \('.*s0.png' is 24x24, '.*s1.png' is "
                                                  r"40x52\): set data.patch_size: \[H, W\].*or data.resize"):
        folder(tmp_path).split("train")
    src = folder(tmp_path, {"resize": [16, 20]})
    images, masks = src.split("train").tensors
    assert images.shape[1:] == (3, 16, 20) and masks.shape[1:] == (16, 20)
    assert set(masks.unique().tolist()) == {0, 1}  # nearest: no blended classes
    assert src.image_size == (16, 20)
    with pytest.raises(unetlab.UnetlabError, match="data.patch_size and data.resize: pick one"):
        folder(tmp_path, {"resize": [16, 16], "patch_size": [8, 8]})
    with pytest.raises(unetlab.UnetlabError, match=r"data.patch_size: expected \[H, W\]"):
        folder(tmp_path, {"patch_size": [8]})


def test_memory_and_disk_paths_give_the_same_data(tmp_path):
    mixed_sizes(tmp_path, 3)
    a = folder(tmp_path, {"resize": [16, 16]}, cache="memory")
    b = folder(tmp_path, {"resize": [16, 16]}, cache="disk")
    ta = a.split("train").tensors
    tb = b.split("train")
    assert not isinstance(tb, torch.utils.data.TensorDataset) and len(tb) == len(ta[0])
    for i in range(len(tb)):
        assert torch.equal(tb[i][0], ta[0][i]) and torch.equal(tb[i][1], ta[1][i])


FILE = """
data:
  dataset: {{name: folder, root: {root}}}
  batch_size: 2
model: {{encoder: {{name: classic, depth: 2, base_channels: 4}}}}
train: {{epochs: 1}}
tracking: {{uri: sqlite:///{store}, log_model: false, figures: false}}
variants:
  patches: {{data.patch_size: [16, 16], data.normalize: {{mode: zscore}}, tracking.figures: true}}
  resized: {{data.resize: [16, 16]}}
"""


def test_mixed_sizes_train_with_patches_and_with_resize(tmp_path, monkeypatch, capsys):
    mixed_sizes(tmp_path / "data")
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(FILE.format(root="data", store=tmp_path / "mlflow.db")))
    monkeypatch.chdir(tmp_path / "data")  # root is relative to the file, not to the working directory
    assert cli_main(["run", str(path), "--quiet"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.count("FINISHED") == 2
    # whole-image validation scores exactly what `unetlab predict` produces from the best checkpoint
    from sklearn.metrics import jaccard_score

    (best,) = [p for p in (tmp_path / "data" / ".unetlab").rglob("best.pt") if "patches" in str(p)]
    checkpoint = torch.load(best, weights_only=True)
    assert checkpoint["normalization"]["mode"] == "zscore"  # predict must apply it to score the same
    val = folder(tmp_path / "data", {"patch_size": [16, 16], "normalize": {"mode": "zscore"}}).whole_images("val")
    files = [str(e.source) for e in val.store.images]
    assert cli_main(["predict", str(best), *files, "--out", str(tmp_path / "pred")]) == 0
    truth = np.concatenate([m.numpy().ravel() for _, m in val])
    predicted = np.concatenate([np.asarray(Image.open(tmp_path / "pred" / f"{Path(f).stem}_mask.png")).ravel() > 0
                                for f in files])
    assert checkpoint["value"] == pytest.approx(jaccard_score(truth, predicted), abs=1e-9)
    # the run's per-image table: one row per whole validation image (not per tile), named by its stem,
    # each what predict scores on that image; split sizes count whole images; the figure shows them
    from mlflow.tracking import MlflowClient

    from unetlab.tracking.per_image import load_per_image_metrics

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("exp").experiment_id
    (run,) = client.search_runs([experiment_id], "tags.unetlab.variant = 'patches'")
    table = load_per_image_metrics(client, run.info.run_id)
    assert list(table) == [Path(f).stem for f in files] == val.names
    for stem, (_, mask) in zip(val.names, val):
        predicted = np.asarray(Image.open(tmp_path / "pred" / f"{stem}_mask.png")).ravel() > 0
        expected = jaccard_score(mask.numpy().ravel(), predicted, zero_division=1.0)
        assert table[stem]["val_iou"] == pytest.approx(expected, abs=1e-9)
    (dataset,) = run.inputs.dataset_inputs
    assert json.loads(dataset.dataset.profile)["splits"] == {"train": 6 - len(files), "val": len(files)}
    assert "predictions.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


# --- normalisation -------------------------------------------------------------------------------------

def test_16_bit_scale_is_the_same_for_dark_and_bright_images(tmp_path):
    dark = np.full((8, 8), 1000, np.uint16)
    bright = np.full((8, 8), 1000, np.uint16)
    bright[:4] = 60000
    write_pair(tmp_path, "dark", dark, np.zeros((8, 8), np.uint8), suffix=".tif")
    write_pair(tmp_path, "bright", bright, np.zeros((8, 8), np.uint8), suffix=".tif")
    src = folder(tmp_path, val_fraction=0.0)
    images = src.split("train").tensors[0]  # sorted stems: bright, dark
    assert images[1, 0, 7, 0].item() == pytest.approx(1000 / 65535)
    assert images[0, 0, 7, 0].item() == pytest.approx(1000 / 65535)  # not 1000 / 60000
    assert src.normalization["mode"] == "dtype" and src.normalization["scale"] == [65535.0]


def test_zscore_and_percentile_come_from_the_training_split(tmp_path):
    rng = np.random.default_rng(1)
    raw = {f"i{k}": rng.integers(0, 4000, (12, 10, 3)).astype(np.uint16) for k in range(4)}
    for stem, image in raw.items():
        write_pair(tmp_path, stem, image, np.zeros((12, 10), np.uint8), suffix=".tif")
    src = folder(tmp_path, {"normalize": {"mode": "zscore"}}, val_fraction=0.25)
    train_stems = stems_of(src, "train")
    pixels = np.concatenate([raw[s].reshape(-1, 3) for s in train_stems]).astype(np.float64)
    assert np.allclose(src.normalization["offset"], pixels.mean(0)) and np.allclose(src.normalization["scale"],
                                                                                     pixels.std(0))
    images = src.split("train").tensors[0]
    assert abs(images.mean().item()) < 1e-3 and images.std(unbiased=False).item() == pytest.approx(1, abs=1e-3)
    pct = folder(tmp_path, {"normalize": {"mode": "percentile", "lower": 1, "upper": 99}}, val_fraction=0.25)
    assert np.allclose(pct.normalization["offset"], np.percentile(pixels, 1, axis=0))
    values = pct.split("train").tensors[0]
    assert values.min().item() == 0.0 and values.max().item() == 1.0
    with pytest.raises(unetlab.UnetlabError, match=r"data.normalize.mode: 'minmax' is not a mode"):
        folder(tmp_path, {"normalize": {"mode": "minmax"}})
    with pytest.raises(unetlab.UnetlabError, match=r"data.normalize.std: must be > 0"):
        folder(tmp_path, {"normalize": {"mode": "fixed", "mean": 0, "std": [1, 0, 1]}})
    with pytest.raises(unetlab.UnetlabError, match=r"data.normalize.lower: not a key of mode zscore"):
        folder(tmp_path, {"normalize": {"mode": "zscore", "lower": 1}})


# --- formats, pairing, masks -------------------------------------------------------------------------

def test_palette_masks_give_indices_and_255_is_ignored(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    indices = np.zeros((8, 8), np.uint8)
    indices[2:4] = 1
    indices[4:6] = 2
    indices[6] = 255  # VOC's "void" boundary
    mask = Image.fromarray(indices, mode="P")
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0, 0, 0] * 252 + [224, 224, 192]
    mask.putpalette(palette)
    mask.save(tmp_path / "masks" / "a_mask.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a.jpg")
    src = folder(tmp_path, val_fraction=0.0, mask_suffix="_mask")
    _, masks = src.split("train").tensors
    assert src.num_classes == 3 and src.ignore_index == IGNORE_INDEX
    assert torch.equal(masks[0], torch.from_numpy(indices.astype(np.int64)))  # indices, not colours


def test_class_values_map_through_a_lookup_table(tmp_path):
    mask = np.array([[0, 50, 100], [100, 50, 0]], np.uint16)
    write_pair(tmp_path, "a", np.zeros((2, 3), np.uint8), np.zeros((2, 3), np.uint8))
    tifffile.imwrite(tmp_path / "masks" / "a.tif", mask)
    (tmp_path / "masks" / "a.png").unlink()
    src = folder(tmp_path, val_fraction=0.0, class_values=[0, 100, 50])
    assert src.split("train").tensors[1][0].tolist() == [[0, 2, 1], [1, 2, 0]]


def test_pairing_and_format_problems(tmp_path):
    write_pair(tmp_path, "a", np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))
    write_pair(tmp_path, "b", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8))
    with pytest.raises(unetlab.UnetlabError, match=r"images mix channel counts: '.*a.png' has 1, '.*b.png' has 3 "
                                                  r"\(set grayscale: true"):
        folder(tmp_path, val_fraction=0.0).split("train")
    assert folder(tmp_path, grayscale=True).in_channels == 1
    tifffile.imwrite(tmp_path / "images" / "b.tif", np.zeros((8, 8), np.uint16))
    (tmp_path / "images" / "b.png").unlink()
    with pytest.raises(unetlab.UnetlabError, match=r"images mix dtypes: '.*a.png' has uint8, '.*b.tif' has uint16"):
        folder(tmp_path, val_fraction=0.0).split("train")
    (tmp_path / "images" / "b.png").write_bytes(b"")
    with pytest.raises(unetlab.UnetlabError, match=r"two files for 'b' in"):
        folder(tmp_path).split("train")
    os.remove(tmp_path / "images" / "b.png")
    Image.fromarray(np.stack([np.zeros((8, 8), np.uint8), np.ones((8, 8), np.uint8), np.zeros((8, 8), np.uint8)],
                             -1)).save(tmp_path / "masks" / "a.png")
    with pytest.raises(unetlab.UnetlabError, match=r"mask '.*a.png' is a colour image with differing channels"):
        folder(tmp_path).split("train")


# --- splits and folds ----------------------------------------------------------------------------------

def small_pool(root: Path, n: int) -> list[str]:
    stems = [f"p{i:02d}" for i in range(n)]
    for stem in stems:
        write_pair(root, stem, np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))
    return stems


def stems_of(src, split: str) -> list[str]:
    return [e.source.stem for e in src.whole_images(split).store.images]


def test_split_files_json_csv_and_folds_lists(tmp_path):
    stems = small_pool(tmp_path / "d", 6)
    (tmp_path / "s.json").write_text(json.dumps({"train": stems[:3], "val": stems[3:5], "test": [stems[5]]}))
    src = folder(tmp_path / "d", split_file=str(tmp_path / "s.json"))
    assert (stems_of(src, "train"), stems_of(src, "val"), stems_of(src, "test")) == (stems[:3], stems[3:5], [stems[5]])
    (tmp_path / "s.csv").write_text("stem,split\n" + "".join(f"{s},{'val' if i < 2 else 'train'}\n"
                                                            for i, s in enumerate(stems)))
    src = folder(tmp_path / "d", split_file=str(tmp_path / "s.csv"))
    assert stems_of(src, "val") == stems[:2] and stems_of(src, "test") == []
    (tmp_path / "f.json").write_text(json.dumps([{"train": stems[2:], "val": stems[:2]},
                                                 {"train": stems[:4], "val": stems[4:]}]))
    assert stems_of(folder(tmp_path / "d", {"fold": 1}, split_file=str(tmp_path / "f.json")), "val") == stems[4:]
    (tmp_path / "bad.json").write_text(json.dumps({"train": stems + ["ghost"]}))
    with pytest.raises(unetlab.UnetlabError, match=r"names samples with no image/mask pair: ghost"):
        folder(tmp_path / "d", split_file=str(tmp_path / "bad.json")).split("train")
    (tmp_path / "twice.csv").write_text(f"{stems[0]},train\n{stems[0]},val\n")
    with pytest.raises(unetlab.UnetlabError, match=rf"'{stems[0]}' is in both train and val"):
        folder(tmp_path / "d", split_file=str(tmp_path / "twice.csv")).split("train")
    (tmp_path / "odd.csv").write_text(f"{stems[0]},holdout\n")
    with pytest.raises(unetlab.UnetlabError, match=r"line 1: expected 'stem,split'"):
        folder(tmp_path / "d", split_file=str(tmp_path / "odd.csv")).split("train")


def test_folds_are_disjoint_cover_the_pool_and_follow_the_dataset_seed(tmp_path):
    stems = small_pool(tmp_path, 11)
    vals = [stems_of(folder(tmp_path, {"folds": 3, "fold": k}), "val") for k in range(3)]
    trains = [stems_of(folder(tmp_path, {"folds": 3, "fold": k}), "train") for k in range(3)]
    assert sorted(s for v in vals for s in v) == stems  # disjoint and covering
    assert all(sorted(t + v) == stems for t, v in zip(trains, vals))
    assert [len(v) for v in vals] == [4, 4, 3]
    assert stems_of(folder(tmp_path, {"folds": 3, "fold": 0}), "val") == vals[0]  # deterministic
    assert stems_of(folder(tmp_path, {"folds": 3, "fold": 0}, seed=5), "val") != vals[0]
    with pytest.raises(unetlab.UnetlabError, match=r"data.fold: 3 is out of range for data.folds: 3 \(0..2\)"):
        folder(tmp_path, {"folds": 3, "fold": 3})
    with pytest.raises(unetlab.UnetlabError, match=r"data.folds: 12 folds need at least 12 training samples"):
        folder(tmp_path, {"folds": 12}).split("train")
    with pytest.raises(unetlab.UnetlabError, match=r"data.folds: the 'shapes' dataset does not support it"):
        configure_source(unetlab.create("dataset", "shapes"), {"folds": 3}, "shapes")


def test_fold_in_a_matrix_and_root_relative_to_the_file(tmp_path, monkeypatch):
    small_pool(tmp_path / "exp" / "data", 4)
    path = tmp_path / "exp" / "folds.yaml"
    path.write_text("data: {dataset: {name: folder, root: data}, folds: 3}\nmatrix: {data.fold: [0, 1, 2]}\n")
    monkeypatch.chdir(tmp_path)
    runs = load_experiment(path).runs
    assert [r.name for r in runs] == ["fold=0/seed=0", "fold=1/seed=0", "fold=2/seed=0"]
    assert runs[0].config["data"]["dataset"]["root"] == str(tmp_path / "exp" / "data")
    by_set = load_experiment(path, ["data.dataset.root=exp/data"]).runs[0]
    assert by_set.config["data"]["dataset"]["root"] == str(tmp_path / "exp" / "data")  # --set: from the cwd
    home = load_experiment(path, ["data.dataset.root=~/x"]).runs[0]
    assert home.config["data"]["dataset"]["root"] == str(Path.home() / "x")


# --- the decode cache ----------------------------------------------------------------------------------

def test_cache_is_rebuilt_when_a_file_changes_and_never_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("UNETLAB_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "d"
    write_pair(data, "a", np.full((8, 8), 10, np.uint8), np.zeros((8, 8), np.uint8))
    first = folder(data, val_fraction=0.0, cache="disk").split("train")[0][0]
    entries = sorted((tmp_path / "cache" / "decoded").rglob("*.npy"))
    assert len(entries) == 2 and first.max().item() == pytest.approx(10 / 255)
    again = folder(data, val_fraction=0.0, cache="disk").split("train")[0][0]
    assert torch.equal(again, first) and sorted((tmp_path / "cache" / "decoded").rglob("*.npy")) == entries
    # same size, new content, an mtime set back to the old one's second: only the ns part differs
    stat = (data / "images" / "a.png").stat()
    Image.fromarray(np.full((8, 8), 20, np.uint8)).save(data / "images" / "a.png")
    assert (data / "images" / "a.png").stat().st_size == stat.st_size
    os.utime(data / "images" / "a.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    changed = folder(data, val_fraction=0.0, cache="disk").split("train")[0][0]
    assert changed.max().item() == pytest.approx(20 / 255)
    # an entry whose metadata never got written (killed mid-write) is decoded again, not read
    for meta in (tmp_path / "cache" / "decoded").rglob("*.json"):
        meta.unlink()
    assert torch.equal(folder(data, val_fraction=0.0, cache="disk").split("train")[0][0], changed)
    assert not list((tmp_path / "cache").rglob("*.tmp*"))


# --- unetlab data ---------------------------------------------------------------------------------------

def test_unetlab_data_report_and_exit_codes(tmp_path, capsys):
    mixed_sizes(tmp_path / "data", 6)
    path = tmp_path / "exp.yaml"
    path.write_text("data: {dataset: {name: folder, root: data, val_fraction: 0.5}, patch_size: [16, 16]}\n")
    assert cli_main(["data", str(path)]) == 0
    out = capsys.readouterr().out
    assert "images: 3 channel(s), uint8; masks: binary {0, 255} -> 2 classes; normalisation: dtype (/255)" in out
    train_line = next(line for line in out.splitlines() if line.strip().startswith("train"))
    assert train_line.split()[1] == "3" and "x" in train_line and "1: " in train_line
    assert "no problems found" in out
    (tmp_path / "data" / "masks" / "s1.png").unlink()
    (tmp_path / "data" / "images" / "s2.png").write_bytes(b"broken")
    assert cli_main(["data", str(path)]) == 2
    captured = capsys.readouterr()
    assert "problems (2):" in captured.out and "images without a mask" in captured.out
    assert "cannot read" in captured.out and "s2.png" in captured.out
    assert captured.err.strip() == f"unetlab: error: {path}: 2 problem(s) in the dataset (listed above)"
