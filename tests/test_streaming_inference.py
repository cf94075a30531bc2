"""Streamed sliding-window inference (issue 24.5): row bands equal the whole logit map of the previous
implementation bit for bit, windows of a raw image normalise like the whole image, whole-image validation
and ``predict`` give the same numbers streamed as whole, ``unetlab data`` warns about images over the
budget, and validating a large image in a real process stays within a memory bound set by tile and batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unetlab
from unetlab.data.normalization import apply_normalization
from unetlab.data.options import configure_source
from unetlab.model.sliding_window import (
    ArrayWindows,
    TensorWindows,
    _mirror_index,
    _mirror_pad,
    blend_window,
    sliding_window_logits,
    stream_logits,
    window_starts,
)
from unetlab.model.unet import build_unet

REGISTRY = unetlab.default_host().registry


def tiny(in_channels: int = 1, out_channels: int = 1, valid: bool = False, seed: int = 0, base: int = 4,
         depth: int = 3):
    def spec(kind, name, **p):
        return {"name": name, **REGISTRY.get(kind, name).defaults(), **p}
    extra = {"padding": "valid", "norm": "none"} if valid else {}
    config = {"encoder": spec("encoder", "classic", depth=depth, base_channels=base, **extra),
              "upsampler": spec("upsampler", "transpose" if valid else "bilinear"),
              "fusion": spec("fusion", "concat"),
              "block": spec("block", "double_conv", **({"norm": "none"} if valid else {})),
              "init": spec("initializer", "default"), "decoder_channels": None}
    torch.manual_seed(seed)
    return build_unet(config, in_channels, out_channels, REGISTRY).eval()


# --- the previous implementation, kept as the reference: whole-size accumulators ------------------------------

def old_accumulate(model, source, boxes, margin, weight, batch_size):
    height = max(t + h for t, _, h, _ in boxes)
    width = max(l + w for _, l, _, w in boxes)
    out = norm = None
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        batch = torch.stack([source[:, t:t + h + 2 * margin, l:l + w + 2 * margin] for t, l, h, w in chunk])
        logits = model(batch).float()
        if out is None:
            out = torch.zeros(logits.shape[1], height, width)
            norm = torch.zeros(height, width)
        for (t, l, h, w), window_logits in zip(chunk, logits):
            out[:, t:t + h, l:l + w] += window_logits * weight
            norm[t:t + h, l:l + w] += weight
    return out / norm


def old_same(model, image, tile, overlap, batch_size=4):
    height, width = image.shape[-2:]
    win_h, win_w = min(tile, height), min(tile, width)
    step = max(tile - overlap, 1)
    boxes = [(t, l, win_h, win_w) for t in window_starts(height, win_h, step)
             for l in window_starts(width, win_w, step)]
    return old_accumulate(model, image, boxes, 0, blend_window(win_h, win_w), batch_size)


def old_valid(model, image, tile, batch_size=4):
    from unetlab.model.sliding_window import _valid_geometry

    channels, height, width = image.shape
    out_side, margin = _valid_geometry(model, channels, tile)
    padded = _mirror_pad(image, margin, margin + max(0, out_side - height), margin, margin + max(0, out_side - width))
    boxes = [(t, l, out_side, out_side) for t in window_starts(max(height, out_side), out_side, out_side)
             for l in window_starts(max(width, out_side), out_side, out_side)]
    return old_accumulate(model, padded, boxes, margin, torch.ones(out_side, out_side), batch_size)[:, :height, :width]


@pytest.mark.parametrize("size", [(37, 53), (130, 77), (16, 200), (61, 61)])
def test_bands_equal_the_previous_whole_map_bit_for_bit(size):
    """Same padding (several window rows, batches crossing rows) and valid padding: the assembled bands are
    torch.equal to the old whole-size accumulation; the bands cover every row once, in order."""
    model = tiny(out_channels=3)
    image = torch.rand(1, *size, generator=torch.Generator().manual_seed(size[0]))
    for tile, overlap in ((16, 5), (32, 8), (24, 0)):
        bands = list(stream_logits(model, TensorWindows(image), tile, overlap))
        assert [top for top, _ in bands] == sorted({top for top, _ in bands})
        assert sum(b.shape[1] for _, b in bands) == size[0] and bands[0][0] == 0
        assert torch.equal(torch.cat([b for _, b in bands], 1), old_same(model, image, tile, overlap))
        assert torch.equal(sliding_window_logits(model, image, tile, overlap), old_same(model, image, tile, overlap))
    valid = tiny(valid=True, depth=2)
    for tile in (44, 60):
        assert torch.equal(sliding_window_logits(valid, image, tile), old_valid(valid, image, tile))


def test_mirrored_windows_equal_windows_of_the_mirror_padded_image():
    rng = np.random.default_rng(0)
    for n, before, after in ((5, 2, 9), (7, 20, 3), (1, 4, 4), (2, 5, 6), (30, 12, 40)):
        row = torch.arange(n, dtype=torch.float32)[None, None].expand(1, 2, n)
        expected = _mirror_pad(row, 0, 0, before, after)[0, 0].long().numpy()
        np.testing.assert_array_equal(_mirror_index(n, before, after, replicate=n == 1), expected)
    raw = (rng.random((9, 13, 2)) * 65535).astype(np.uint16)
    spec = {"mode": "zscore", "offset": [1000.0, 20.0], "scale": [300.0, 7.0], "clip": None}
    whole = torch.from_numpy(apply_normalization(raw, spec))
    pads = (6, 11, 6, 8)
    padded = _mirror_pad(whole, *pads)
    for windows in (ArrayWindows(raw, spec), TensorWindows(whole)):
        assert torch.equal(windows.window(2, 3, 5, 7), whole[:, 2:7, 3:10])
        for top, left in ((0, 0), (10, 12), (19, 20)):
            assert torch.equal(windows.mirrored(top, left, 7, 7, pads), padded[:, top:top + 7, left:left + 7])


# --- validation and predict: streamed equals whole --------------------------------------------------------------

def folder_pool(root: Path, sizes, channels: int = 3, classes: int = 2) -> None:
    rng = np.random.default_rng(5)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for k, (h, w) in enumerate(sizes):
        image = (rng.random((h, w, channels)) * 255).astype(np.uint8).squeeze()
        mask = rng.integers(0, classes, (h, w)).astype(np.uint8) * (255 if classes == 2 else 1)
        mask[: h // 3] = 0
        Image.fromarray(image).save(root / "images" / f"i{k}.png")
        Image.fromarray(mask).save(root / "masks" / f"i{k}.png")


def folder(root: Path, **data):
    source = unetlab.create("dataset", "folder", root=str(root), val_fraction=0.5, seed=1)
    return configure_source(source, {"patch_size": [16, 16], **data}, "folder")


@pytest.mark.parametrize("classes", [2, 3])
def test_streamed_validation_equals_whole_image_validation(tmp_path, monkeypatch, classes):
    """Images of odd sizes, validated whole (the previous path: dataset item, whole logits) and streamed in
    row bands (a budget of 1 byte): confusion metrics identical, cross-entropy loss to float rounding;
    per-image rows likewise."""
    from unetlab.tracking.per_image import validation_per_image
    from unetlab.training.trainer import build_loss, build_metrics
    from unetlab.training.whole_image_validation import evaluate_whole_images, whole_image_logits

    folder_pool(tmp_path / "d", [(45, 71), (90, 33), (64, 64), (23, 101)], classes=classes)
    source = folder(tmp_path / "d", normalize={"mode": "zscore", "scope": "image"})
    val = source.whole_images("val")
    model = tiny(3, 1 if classes == 2 else classes)
    train = {"loss": [{"name": "cross_entropy", "weight": 1.0}], "metrics": [{"name": "iou"}, {"name": "dice"}]}

    def parts():
        return build_loss(train, classes, REGISTRY, 255), build_metrics(train, classes, REGISTRY, 255)

    loss_fn, metrics = parts()
    for metric in metrics:
        metric.reset()
    losses = []
    for index in range(len(val)):  # the previous implementation of evaluate_whole_images
        image, mask = val[index]
        logits = whole_image_logits(model, image, torch.device("cpu"), tile=16, overlap=4)
        target = mask.long()[None]
        losses.append(float(loss_fn(logits, target)))
        for metric in metrics:
            metric.update(logits, target)
    old = {"val_loss": sum(losses) / len(losses)}
    for metric in metrics:
        old.update({f"val_{key}": v for key, v in metric.compute().items()})
    whole = evaluate_whole_images(model, val, *parts(), torch.device("cpu"), tile=16, overlap=4)
    assert whole == old  # under the budget: the previous numbers exactly
    monkeypatch.setenv("UNETLAB_VALIDATION_MEMORY_MB", "0.000001")
    with pytest.warns(UserWarning, match="row bands"):
        streamed = evaluate_whole_images(model, val, *parts(), torch.device("cpu"), tile=16, overlap=4)
    assert set(streamed) == set(old) and len(old) == 3 + (2 * classes if classes > 2 else 0)
    for key in old:
        if key == "val_loss":
            assert streamed[key] == pytest.approx(old[key], rel=1e-5)
        else:
            assert streamed[key] == old[key], key
    rows = validation_per_image(model, source, train, classes, REGISTRY)
    monkeypatch.delenv("UNETLAB_VALIDATION_MEMORY_MB")
    whole_rows = validation_per_image(model, source, train, classes, REGISTRY)
    assert [r["image"] for r in rows] == val.names == [r["image"] for r in whole_rows]
    for a, b in zip(rows, whole_rows):  # rows use predict's default tile: these images go whole, in one band
        assert {key: v for key, v in a.items() if key != "val_loss"} == \
            {key: v for key, v in b.items() if key != "val_loss"}
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


@pytest.mark.parametrize("classes", [1, 3])
def test_predict_streams_the_same_mask_as_the_whole_probabilities(tmp_path, classes):
    """``streamed_mask`` on raw images of odd sizes (auto tiling forced small) equals the mask of
    ``predict_probabilities`` on the whole normalised image, exactly."""
    import unetlab.model.sliding_window as inference
    from unetlab.deploy.predict import predict_probabilities, streamed_mask

    model = tiny(1, classes)
    rng = np.random.default_rng(2)
    spec = {"mode": "percentile", "scope": "image", "channels": 1, "clip": None, "percentiles": [1.0, 99.8]}
    for size in ((57, 83), (120, 45)):
        raw = (rng.random((*size, 1)) * 4000).astype(np.uint16)
        if classes == 1:  # centre the logits: a mask neither all 0 nor all 1
            with torch.no_grad():
                model.head.bias -= model(torch.from_numpy(apply_normalization(raw, spec))[None]).median()
        probs = predict_probabilities(model, torch.from_numpy(apply_normalization(raw, spec)), tile=24, overlap=6)
        expected = ((probs[0] > 0.5).numpy() * 255).astype(np.uint8) if classes == 1 else \
            probs.argmax(0).numpy().astype(np.uint8)
        got = streamed_mask(model, raw, spec, tile=24, overlap=6)
        np.testing.assert_array_equal(got, expected)
        assert classes == 3 or 0 < (got > 0).mean() < 1
    assert inference.AUTO_TILE == 512


def test_unetlab_data_warns_about_images_over_the_validation_budget(tmp_path, capsys):
    from unetlab.cli.main import main as cli_main

    folder_pool(tmp_path / "d", [(40, 60), (300, 200), (40, 44), (300, 210)])
    exp = tmp_path / "exp.yaml"
    exp.write_text(textwrap.dedent("""
        data: {dataset: {name: folder, root: d, val_fraction: 0.5, seed: 1}, patch_size: [16, 16]}
        model: {encoder: {name: classic, depth: 2, base_channels: 4}}
    """))
    os.environ["UNETLAB_VALIDATION_MEMORY_MB"] = "1"
    try:
        assert cli_main(["data", str(exp)]) == 0
    finally:
        del os.environ["UNETLAB_VALIDATION_MEMORY_MB"]
    out = capsys.readouterr().out
    warned = [line for line in out.splitlines() if "warning:" in line]
    source = folder(tmp_path / "d")
    large = [n for n, (h, w) in zip(source.whole_images("val").names,
                                    [s.shape for s in source.whole_images("val").store.images]) if h * w > 50_000]
    assert large and len(warned) == len(large) and all("row bands" in line and "1 MB budget" in line
                                                       for line in warned), out
    assert cli_main(["data", str(exp)]) == 0 and "warning:" not in capsys.readouterr().out


# --- memory: a large image in a real process ----------------------------------------------------------------------

CHILD = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
import unetlab
from unetlab.data.options import configure_source
from unetlab.training.trainer import build_loss, build_metrics
from unetlab.model.unet import build_unet
from unetlab.training.whole_image_validation import evaluate_whole_images
reg = unetlab.default_host().registry
def spec(kind, name, **p):
    return {"name": name, **reg.get(kind, name).defaults(), **p}
config = {"encoder": spec("encoder", "classic", depth=3, base_channels=8), "upsampler": spec("upsampler", "bilinear"),
          "fusion": spec("fusion", "concat"), "block": spec("block", "double_conv"),
          "init": spec("initializer", "default"), "decoder_channels": None}
torch.manual_seed(0)
model = build_unet(config, 3, 1, reg).eval()
source = configure_source(unetlab.create("dataset", "folder", root=sys.argv[1], split_file=sys.argv[1] + "/split.json"),
                          {"patch_size": [64, 64]}, "folder")
train = {"loss": [{"name": "cross_entropy", "weight": 1.0}], "metrics": [{"name": "iou"}, {"name": "dice"}]}
args = (build_loss(train, 2, reg, 255), build_metrics(train, 2, reg, 255), torch.device("cpu"))
def peak_kb():  # VmHWM: this process's own peak; ru_maxrss starts at the forking parent's RSS on Linux
    try:
        return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
evaluate_whole_images(model, source.whole_images("train"), *args, tile=128)  # warm-up: a 300x300 image
before = peak_kb()
result = evaluate_whole_images(model, source.whole_images("val"), *args, tile=128)
after = peak_kb()
print(json.dumps({"before_kb": before, "after_kb": after, "result": result}))
"""


@pytest.mark.slow
def test_validating_a_2000_pixel_image_stays_within_a_bound_set_by_tile_and_batch(tmp_path):
    """Whole-image validation of a 2000x2000 RGB image in a child process (tile 128, 4 windows a batch):
    its peak RSS grows by less than a bound computed from the tile, the batch and the width -- the
    previous implementation held the whole image's input, logits and loss intermediates and exceeds it.
    The child reads its own peak (VmHWM; ``ru_maxrss`` of a child on Linux starts at the RSS its parent
    had when it forked, here pytest's, which would hide the growth)."""
    from unetlab.model.sliding_window import streaming_bytes

    root = tmp_path / "d"
    folder_pool(root, [(300, 300), (2000, 2000)])
    (root / "split.json").write_text(json.dumps({"train": ["i0"], "val": ["i1"]}))
    env = {**os.environ, "UNETLAB_CACHE_DIR": str(tmp_path / "cache"), "UNETLAB_VALIDATION_MEMORY_MB": "16",
           "OMP_NUM_THREADS": "1"}
    configure_source(unetlab.create("dataset", "folder", root=str(root), split_file=str(root / "split.json")),
                     {"patch_size": [64, 64]}, "folder").check()  # decode into the cache here, not in the child
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root)], env=env, text=True, capture_output=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    grown = (measured["after_kb"] - measured["before_kb"]) * 1024
    # bound: the streaming buffers, the model's activations for a batch of windows (8 channels, a few maps
    # alive at full resolution), and the raw image's pages read from the cache (12 MB), with slack
    tile, batch = 128, 4
    activations = 8 * batch * tile * tile * 4 * 8
    bound = streaming_bytes(3, 1, 2000, tile, batch) + activations + 2000 * 2000 * 3 + 48 * 2 ** 20
    assert grown < bound, (grown / 2 ** 20, bound / 2 ** 20, measured)
    assert 0 <= measured["result"]["val_iou"] <= 1 and measured["result"]["val_loss"] > 0
