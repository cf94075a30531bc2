"""What a patch-trained folder run reports about its validation images: each fold its own source, per-image
rows for whole images (named by stem, through the sliding window, ignoring 255), whole-image split sizes.
End to end through ``unetlab run``: tests/test_folder_data.py::test_mixed_sizes_train_with_patches_and_with_resize."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_folder_data import folder, write_pair

from unetlab.data.patches import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[1]
SIZES = [(24, 24), (40, 52), (20, 36)]


def three_class_pool(root: Path, n: int = 6) -> list[str]:
    """Images of mixed sizes with class-index masks 0..2 and a 255 ('ignore') border row."""
    rng = np.random.default_rng(3)
    stems = [f"case{i}" for i in range(n)]
    for i, stem in enumerate(stems):
        h, w = SIZES[i % 3]
        mask = np.zeros((h, w), np.uint8)
        mask[4:12, 6:14] = 1
        mask[14:18, 2:10] = 2
        mask[0] = 255
        write_pair(root, stem, (rng.random((h, w, 3)) * 255).astype(np.uint8), mask)
    return stems


def test_each_fold_of_a_folder_experiment_gets_its_own_source():
    # folder_example.yaml: 5 folds in a matrix; runs differing only in data.fold must not share a source
    from unetlab.config.experiment import load_experiment
    from unetlab.data.splits import kfold
    from unetlab.plugin_api.host import default_host
    from unetlab.training.preflight import dataset_key, prepare_all
    from unetlab.training.whole_image_validation import validation_images

    runs = load_experiment(REPO / "experiments" / "folder_example.yaml",
                           ["model.encoder.depth=2", "model.encoder.base_channels=4"]).runs  # quick to check
    assert len(runs) == 5
    prepared = prepare_all(runs, default_host().registry)
    vals = [list(validation_images(p.source).names) for p in prepared]
    pool = sorted(p.stem for p in (REPO / "experiments" / "folder_example" / "images").iterdir())
    assert sorted(s for v in vals for s in v) == pool  # disjoint folds covering the pool, not fold 0 five times
    assert vals == [kfold(pool, 5, k, 0)[1] for k in range(5)]
    loader_only = {**runs[0].config, "data": {**runs[0].config["data"], "batch_size": 3, "num_workers": 2}}
    assert dataset_key(loader_only) == dataset_key(runs[0].config) != dataset_key(runs[1].config)


def test_per_image_rows_are_whole_images_by_the_sliding_window_ignoring_255(tmp_path):
    from sklearn.metrics import jaccard_score

    from unetlab.model.sliding_window import sliding_window_logits
    from unetlab.plugin_api.host import default_host
    from unetlab.tracking.per_image import validation_per_image
    from unetlab.training.dataset_identity import dataset_identity
    from unetlab.training.trainer import build_loss, build_metrics
    from unetlab.training.whole_image_validation import evaluate_whole_images

    three_class_pool(tmp_path)
    src = folder(tmp_path, {"patch_size": [16, 16]}, val_fraction=0.5)
    assert src.ignore_index == IGNORE_INDEX and src.num_classes == 3
    whole = src.whole_images("val")
    assert len(src.split("val")) > len(whole)  # tiles: the wrong thing to count or score
    registry = default_host().registry
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, 3, padding=1).eval()  # any model: the rows depend on how it is called
    train = {"loss": [{"name": "cross_entropy", "weight": 1.0}], "metrics": [{"name": "iou"}]}
    rows = validation_per_image(model, src, train, 3, registry)  # raised IndexError on 255 before
    stems = [e.source.stem for e in whole.store.images]
    assert [r["image"] for r in rows] == stems and all(s.startswith("case") for s in stems)
    for row, (image, mask) in zip(rows, whole):
        logits = sliding_window_logits(model, image)[None]
        valid = mask != IGNORE_INDEX
        reference = F.cross_entropy(logits.permute(0, 2, 3, 1)[0][valid], mask[valid])
        assert row["val_loss"] == pytest.approx(reference.item(), rel=1e-5)
        predicted = logits.argmax(1)[0][valid].numpy()
        assert row["val_iou"] == pytest.approx(jaccard_score(mask[valid].numpy(), predicted, labels=[1, 2],
                                                             average="macro", zero_division=1.0), abs=1e-6)
    # the rows are what validation computes: its loss is the mean of the per-image losses
    scored = evaluate_whole_images(model, whole, build_loss(train, 3, registry, IGNORE_INDEX),
                                   build_metrics(train, 3, registry, IGNORE_INDEX), torch.device("cpu"))
    assert scored["val_loss"] == pytest.approx(np.mean([r["val_loss"] for r in rows]), rel=1e-6)
    # the logged split sizes count whole images too
    prepared = SimpleNamespace(run=SimpleNamespace(config={"data": {"dataset": {"name": "folder"}}}), source=src)
    assert dataset_identity(prepared)[2] == {"train": 3, "val": 3}
