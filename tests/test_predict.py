"""``unetlab predict``: models loaded as data from stores and checkpoints, sliding-window inference
(against independent computations), automatic tiling of large images, and bad inputs refused in one line
before anything is written."""

from __future__ import annotations

import contextlib
import math
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from skimage import io

import unetlab
from unetlab.checkpoint import save_atomic
from unetlab.model.unet import build_unet

from conftest import one_line_error, run_cli

REGISTRY = unetlab.default_host().registry


def tiny_model(seed: int = 0, valid: bool = False, out_channels: int = 1):
    """A small randomly initialised U-Net and its config (same or valid padding)."""
    def spec(kind, name, **p):
        return {"name": name, **REGISTRY.get(kind, name).defaults(), **p}
    extra = {"padding": "valid", "norm": "none"} if valid else {}
    config = {"encoder": spec("encoder", "classic", depth=3, base_channels=4, **extra),
              "upsampler": spec("upsampler", "transpose" if valid else "bilinear"),
              "fusion": spec("fusion", "concat"),
              "block": spec("block", "double_conv", **({"norm": "none"} if valid else {})),
              "init": spec("initializer", "default"), "decoder_channels": None}
    torch.manual_seed(seed)
    model = build_unet(config, 1, out_channels, REGISTRY).eval()
    with torch.no_grad():
        model.head.bias.fill_(0.05)  # a mask that is neither all 0 nor all 1 from a random model
    return config, model


def save_checkpoint(path: Path, config: dict, model, out_channels: int = 1) -> Path:
    save_atomic({"model": model.state_dict(), "model_config": config, "in_channels": 1,
                 "out_channels": out_channels}, path)
    return path


def write_image(path, size, seed=0):
    rng = np.random.default_rng(seed)
    io.imsave(path, (rng.random(size) * 255).astype(np.uint8), check_contrast=False)


class Payload:
    """Unpickling this creates ``marker``: stands for any code a planted pickle would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def cli(capsys, *args: str) -> subprocess.CompletedProcess:
    """``unetlab ARGS`` in this process (main() as the console script calls it), output captured."""
    from unetlab.cli.main import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


# --- models from a tracking store: weights only -------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store with one run that logged, as ``unetlab run`` does, a weights artifact and an MLflow model."""
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    from unetlab.training.model_store import log_model_weights

    tmp = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp / 'm.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("predict_test", artifact_location=(tmp / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    config, model = tiny_model(0)
    log_model_weights(SimpleNamespace(client=client, run_id=run_id), model,
                      {"model_config": config, "in_channels": 1, "out_channels": 1})
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(run_id=run_id):
            model_uri = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                                 pip_requirements=[]).model_uri
    finally:
        mlflow.set_tracking_uri(None)
    client.set_terminated(run_id)
    return SimpleNamespace(uri=uri, client=client, run_id=run_id, model_uri=model_uri, model=model, tmp=tmp,
                           experiment=experiment, checkpoint=save_checkpoint(tmp / "best.pt", config, model))


def test_predict_and_export_by_run_id_never_unpickle_the_store(store, tmp_path, capsys):
    """Issue 13.1: a planted pickle in place of the logged MLflow model must not run."""
    import mlflow.pytorch

    from unetlab.deploy.predict import predict_probabilities

    marker = tmp_path / "pwned"
    pickles = list((store.tmp / "artifacts").rglob("model.pth"))
    assert pickles, "the MLflow model's pickle was not found"
    for path in pickles:
        torch.save(Payload(str(marker)), path)
    write_image(tmp_path / "a.png", (40, 52))
    proc = cli(capsys, "predict", store.run_id, str(tmp_path / "a.png"), "--out", str(tmp_path / "masks"),
               "--tracking-uri", store.uri)
    assert proc.returncode == 0, proc.stderr
    proc = cli(capsys, "export", store.run_id, "--out", str(tmp_path / "m.pt2"), "--tracking-uri", store.uri)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    # the mask is the logged weights' prediction
    image = torch.from_numpy(io.imread(tmp_path / "a.png").astype(np.float32) / 255)[None]
    expected = ((predict_probabilities(store.model, image)[0] > 0.5).numpy() * 255).astype(np.uint8)
    mask = io.imread(tmp_path / "masks" / "a_mask.png")
    assert 0 < (mask > 0).mean() < 1
    np.testing.assert_array_equal(mask, expected)
    # the planted pickle is live: MLflow's own loader runs it (so the check above can fail)
    mlflow.set_tracking_uri(store.uri)
    with contextlib.suppress(Exception):  # it returns a file object, not a model: MLflow may complain after
        mlflow.pytorch.load_model(store.model_uri)
    assert marker.exists()


def test_tampered_weights_and_missing_weights_are_refused_in_one_line(store, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    marker = tmp_path / "pwned"
    client = MlflowClient(store.uri)
    tampered = client.create_run(store.experiment).info.run_id
    (tmp_path / "up").mkdir()
    torch.save({"model": Payload(str(marker)), "model_config": {}, "in_channels": 1, "out_channels": 1},
               tmp_path / "up" / "weights.pt")
    client.log_artifact(tampered, str(tmp_path / "up" / "weights.pt"), "unetlab_model")
    bare = client.create_run(store.experiment).info.run_id
    write_image(tmp_path / "a.png", (16, 16))
    for run_id, expected in ((tampered, "which could run code (refused)"), (bare, "has no unetlab_model/weights.pt")):
        for command in (["predict", run_id, str(tmp_path / "a.png"), "--out", str(tmp_path / "out")],
                        ["export", run_id, "--out", str(tmp_path / "x.pt2")]):
            line = one_line_error(cli(capsys, *command, "--tracking-uri", store.uri))
            assert run_id in line and expected in line, line
    assert not marker.exists() and not (tmp_path / "out").exists() and not (tmp_path / "x.pt2").exists()


def test_run_id_runs_and_models_uris_load_the_same_weights(store):
    import mlflow

    from unetlab.training.model_store import load_model

    mlflow.set_tracking_uri(store.uri)
    store.client.create_registered_model("tiny")
    store.client.create_model_version("tiny", source=store.model_uri, run_id=store.run_id)
    store.client.set_registered_model_alias("tiny", "champion", "1")
    x = torch.rand(2, 1, 24, 20)
    expected = store.model(x)
    for spec in (store.run_id, f"runs:/{store.run_id}/model", store.model_uri, "models:/tiny/1",
                 "models:/tiny@champion", "models:/tiny/latest", str(store.checkpoint)):
        torch.testing.assert_close(load_model(spec)(x), expected, msg=spec)


# --- the sliding window against independent computations ------------------------------------------------------


def test_tiles_of_a_pointwise_model_equal_the_whole_image():
    """A 1x1 conv is exactly translation-equivariant: every tiling must reproduce it (odd, small sizes too)."""
    from unetlab.model.sliding_window import sliding_window_logits

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, 1)
    for height, width in ((37, 53), (20, 30), (64, 64), (5, 130)):
        image = torch.randn(2, height, width)
        whole = conv(image[None])[0].detach()
        for tile, overlap, batch, mode in ((16, 4, 1, "gaussian"), (24, 10, 3, "hann"), (64, 8, 4, "constant"),
                                           (33, 25, 2, "gaussian")):
            tiled = sliding_window_logits(conv, image, tile, overlap, batch_size=batch, mode=mode)
            assert tiled.shape == whole.shape
            torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)


def test_windows_are_placed_and_blended_as_computed_by_hand():
    """A model that outputs each pixel's row and column inside its window: the blend is a weighted mean of
    window positions, computed here from the hand-placed windows and the Gaussian formula."""
    from unetlab.model.sliding_window import sliding_window_logits

    class Position(torch.nn.Module):
        def forward(self, x):
            n, _, h, w = x.shape
            rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
            cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
            return torch.stack([rows, cols])[None].expand(n, 2, h, w)

    height, width, tile, overlap = 10, 13, 6, 2
    # starts by hand: rows need ceil((10-6)/4)+1 = 2 windows at 0, 4; columns ceil((13-6)/4)+1 = 3 at 0, 3.5->4, 7
    row_starts, col_starts = [0, 4], [0, 4, 7]
    sigma = tile / 8
    g = np.exp(-(np.arange(tile) - (tile - 1) / 2) ** 2 / (2 * sigma ** 2))
    num = np.zeros((2, height, width))
    den = np.zeros((height, width))
    for r in row_starts:
        for c in col_starts:
            weight = np.outer(g, g) / g.max() ** 2
            num[0, r:r + tile, c:c + tile] += weight * np.arange(tile)[:, None]
            num[1, r:r + tile, c:c + tile] += weight * np.arange(tile)[None, :]
            den[r:r + tile, c:c + tile] += weight
    got = sliding_window_logits(Position(), torch.zeros(1, height, width), tile, overlap, batch_size=4)
    np.testing.assert_allclose(got.numpy(), num / den, atol=1e-5)


def test_gaussian_window_equals_a_hand_computed_gaussian():
    from scipy.ndimage import gaussian_filter

    from unetlab.model.sliding_window import blend_window

    for n in (9, 33):  # odd: nnU-Net's construction (a filtered centred impulse) is exact
        impulse = np.zeros((n, n))
        impulse[n // 2, n // 2] = 1
        reference = gaussian_filter(impulse, n / 8, mode="constant", truncate=20)
        np.testing.assert_allclose(blend_window(n, n).numpy(), reference / reference.max(), atol=1e-6)
    h, w = 12, 7  # even and rectangular: exp(-d^2 / 2 sigma^2) about the centre (n - 1) / 2
    gy = [math.exp(-(i - 5.5) ** 2 / (2 * 1.5 ** 2)) for i in range(h)]
    gx = [math.exp(-(j - 3) ** 2 / (2 * 0.875 ** 2)) for j in range(w)]
    expected = np.outer(gy, gx)
    np.testing.assert_allclose(blend_window(h, w).numpy(), expected / expected.max(), atol=1e-6)


def test_valid_padding_equals_the_mirrored_whole_image():
    """Overlap-tile: tiled output equals one pass over the whole image mirror-padded by the margin (numpy)."""
    from unetlab.model.sliding_window import sliding_window_logits
    from unetlab.model.unet import output_shape

    _, model = tiny_model(1, valid=True, out_channels=2)
    tile = 92
    margin = (tile - output_shape(model, 1, tile, tile)[-1]) // 2
    height = next(h for h in range(60, 200) if output_shape(model, 1, h + 2 * margin, h + 2 * margin)[-1] == h)
    image = torch.rand(1, height, height, generator=torch.Generator().manual_seed(2))
    padded = np.pad(image.numpy(), [(0, 0), (margin, margin), (margin, margin)], mode="reflect")
    with torch.no_grad():
        reference = model(torch.from_numpy(padded)[None])[0]
    for tile_size, batch in ((tile, 1), (tile + 32, 3)):
        tiled = sliding_window_logits(model, image, tile_size, batch_size=batch)
        torch.testing.assert_close(tiled, reference, atol=1e-4, rtol=1e-4)
    small = sliding_window_logits(model, image[:, :7, :11], tile)  # smaller than one output block
    assert small.shape == (2, 7, 11) and torch.isfinite(small).all()


def test_tiled_unet_matches_whole_image_and_tta_keeps_shape():
    from unetlab.deploy.predict import predict_probabilities

    _, model = tiny_model(0)
    image = torch.rand(1, 120, 100, generator=torch.Generator().manual_seed(0))
    whole = predict_probabilities(model, image)
    for tile, overlap in ((48, 16), (64, 24)):
        tiled = predict_probabilities(model, image, tile=tile, overlap=overlap)
        assert ((tiled > 0.5) == (whole > 0.5)).float().mean() > 0.99
        assert (tiled - whole).abs().mean() < 0.01
    flipped = predict_probabilities(model, image, tta=True)
    assert flipped.shape == whole.shape and torch.isfinite(flipped).all()


def test_a_large_image_is_tiled_automatically_in_bounded_batches(monkeypatch):
    """Issue 13.8: without --tile, an image above the pixel threshold goes through the model in tiles."""
    from unetlab.deploy.predict import predict_probabilities
    from unetlab.model import sliding_window as inference

    _, model = tiny_model(0)
    image = torch.rand(1, 150, 130, generator=torch.Generator().manual_seed(3))
    whole = predict_probabilities(model, image)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    monkeypatch.setattr(inference, "AUTO_TILE_PIXELS", 64 * 64)
    monkeypatch.setattr(inference, "AUTO_TILE", 64)
    tiled = predict_probabilities(model, image)
    assert len(seen) > 1 and all(s[0] <= 4 and s[2] <= 64 and s[3] <= 64 for s in seen), seen
    assert ((tiled > 0.5) == (whole > 0.5)).float().mean() > 0.99
    assert (tiled - whole).abs().mean() < 0.01


# --- the CLI: checkpoint files, overlap-tile, bad inputs --------------------------------------------------------


def test_predict_checkpoint_folder_and_overlay(tmp_path, capsys):
    config, model = tiny_model(0)
    ckpt = save_checkpoint(tmp_path / "best.pt", config, model)
    write_image(tmp_path / "a.png", (40, 52))
    (tmp_path / "folder").mkdir()
    write_image(tmp_path / "folder" / "b.png", (33, 33), seed=1)
    proc = cli(capsys, "predict", str(ckpt), str(tmp_path / "a.png"), str(tmp_path / "folder"), "--out",
               str(tmp_path / "out"), "--overlay")
    assert proc.returncode == 0, proc.stderr
    mask = io.imread(tmp_path / "out" / "a_mask.png")
    assert mask.shape == (40, 52) and set(np.unique(mask)) == {0, 255}
    assert io.imread(tmp_path / "out" / "b_mask.png").shape == (33, 33)
    assert io.imread(tmp_path / "out" / "a_overlay.png").shape == (40, 52, 3)


def test_paper_mode_overlap_tile_covers_the_whole_image(tmp_path, capsys):
    config, model = tiny_model(0, valid=True, out_channels=2)
    ckpt = save_checkpoint(tmp_path / "valid.pt", config, model, out_channels=2)
    write_image(tmp_path / "big.png", (300, 260))
    proc = cli(capsys, "predict", str(ckpt), str(tmp_path / "big.png"), "--out", str(tmp_path / "out"),
               "--tile", "188")
    assert proc.returncode == 0, proc.stderr
    mask = io.imread(tmp_path / "out" / "big_mask.png")
    assert mask.shape == (300, 260) and set(np.unique(mask)) <= {0, 1}


def test_bad_inputs_are_refused_in_one_line_with_nothing_written(tmp_path, capsys):
    """Issue 13.9: each case exits 2 with one line, and no mask is written."""
    import tifffile

    config, model = tiny_model(0)
    ckpt = str(save_checkpoint(tmp_path / "best.pt", config, model))
    good = tmp_path / "good"
    good.mkdir()
    write_image(good / "a.png", (32, 32))
    write_image(good / "b.png", (40, 36), seed=1)
    write_image(tmp_path / "tiny.png", (1, 1))
    stack = tmp_path / "stack.tif"
    for page in range(3):
        tifffile.imwrite(stack, np.full((16, 16), page * 50, np.uint8), append=True)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a.png", "b.png"):
        (broken / name).write_bytes((good / name).read_bytes())
    (broken / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    out = tmp_path / "out"
    cases = [
        ([str(tmp_path / "tiny.png")], [], "is 1x1: this model needs images of at least 4x4 pixels"),
        ([str(good)], ["--tile", "0"], "--tile 0: this model needs tiles of at least 4 pixels"),
        ([str(good)], ["--tile", "-8"], "--tile -8: this model needs tiles of at least 4 pixels"),
        ([str(good)], ["--tile", "3"], "--tile 3: this model needs tiles of at least 4 pixels"),
        ([str(good)], ["--tile", "16", "--overlap", "16"], "--overlap 16: must be smaller than the tile (16)"),
        ([str(good)], ["--overlap", "-1"], "--overlap -1: must be 0 or more"),
        ([str(stack)], [], "is a multi-page TIFF (3 pages)"),
        ([str(broken)], [], f"cannot read '{broken / 'c.png'}'"),
    ]
    for inputs, options, expected in cases:
        line = one_line_error(cli(capsys, "predict", ckpt, *inputs, "--out", str(out), *options))
        assert expected in line, (expected, line)
        assert not out.exists(), inputs  # checked before the output folder is even created
    assert "stack.tif" in one_line_error(cli(capsys, "predict", ckpt, str(stack), "--out", str(out)))


def test_unknown_model_spec_is_one_line(store, tmp_path, capsys):
    write_image(tmp_path / "a.png", (8, 8))
    line = one_line_error(cli(capsys, "predict", "no-such-run", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"),
                              "--tracking-uri", store.uri))
    assert "neither a checkpoint file, an MLflow run id" in line


def test_images_are_normalised_as_the_model_was_trained(tmp_path):
    """The checkpoint's normalisation spec is applied; without one, integers scale by their type, not per image."""
    from unetlab.deploy.predict import read_image
    from unetlab.training.model_store import load_trained

    config, model = tiny_model(0)
    spec = {"mode": "fixed", "offset": [100.0], "scale": [50.0], "clip": None}
    save_atomic({"model": model.state_dict(), "model_config": config, "in_channels": 1, "out_channels": 1,
                 "normalization": spec}, tmp_path / "norm.pt")
    assert load_trained(str(tmp_path / "norm.pt")).normalization == spec
    dark = np.array([[0, 50], [100, 200]], np.uint16)  # a dark 16-bit image: max below 255
    io.imsave(tmp_path / "dark.png", dark, check_contrast=False)
    np.testing.assert_allclose(read_image(tmp_path / "dark.png", 1, spec)[0].numpy(), (dark - 100.0) / 50.0)
    np.testing.assert_allclose(read_image(tmp_path / "dark.png", 1)[0].numpy(), dark / 65535.0, rtol=1e-6)


def test_unetlab_run_logs_the_weights_that_predict_reads(tmp_path, capsys):
    """End to end: ``unetlab run`` logs unetlab_model/weights.pt; predict by run id equals predict by best.pt."""
    import textwrap

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    exp = tmp_path / "exp.yaml"
    exp.write_text(textwrap.dedent(f"""
        name: predict_run
        data: {{dataset: {{name: blobs, image_size: 32, n_train: 8, n_val: 4}}, batch_size: 4}}
        model: {{encoder: {{name: classic, depth: 2, base_channels: 4}}}}
        train: {{epochs: 1, lr: 0.01}}
        tracking: {{uri: '{uri}', checkpoint_dir: '{tmp_path / 'ckpt'}', log_model: true, figures: false}}
    """))
    proc = run_cli("run", str(exp), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("predict_run")
    run_id = next(r.info.run_id for r in client.search_runs([experiment.experiment_id])
                  if "mlflow.parentRunId" in r.data.tags)
    assert "unetlab_model/weights.pt" in {f.path for f in client.list_artifacts(run_id, "unetlab_model")}
    write_image(tmp_path / "a.png", (40, 52))
    best = str(next((tmp_path / "ckpt").rglob("best.pt")))
    for spec, out in ((run_id, "by_run"), (best, "by_checkpoint")):
        proc = cli(capsys, "predict", spec, str(tmp_path / "a.png"), "--out", str(tmp_path / out),
                   "--tracking-uri", uri)
        assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(io.imread(tmp_path / "by_run" / "a_mask.png"),
                                  io.imread(tmp_path / "by_checkpoint" / "a_mask.png"))


# --- an image is the same tensor in training and in predict -------------------------------------------------


def _folder_source(root: Path, grayscale: bool, data: dict):
    from unetlab.data.options import configure_source

    source = unetlab.create("dataset", "folder", root=str(root), grayscale=grayscale, val_fraction=0.0)
    return configure_source(source, data, "folder")


def test_predict_feeds_the_model_the_tensor_training_feeds_it(tmp_path):
    """Each file, read by predict, equals the folder dataset's training tensor for it: same decoder (alpha
    dropped, 1-bit as 0/255), same rounded grey mean, same resize, same normalisation spec."""
    from PIL import Image

    from unetlab.deploy.predict import read_image

    rng = np.random.default_rng(0)
    h, w = 18, 22
    rgb = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    grey = (rng.random((h, w)) * 255).astype(np.uint8)
    files = {  # name: (PIL image, model channels)
        "rgb3": (Image.fromarray(rgb), 3),
        "rgb1": (Image.fromarray(rgb), 1),  # a grey model on colour files: training's grayscale: true
        "rgba": (Image.fromarray(np.dstack([rgb, grey])), 3),
        "grey_alpha": (Image.fromarray(np.dstack([grey, 255 - grey])).convert("LA"), 1),
        "grey16": (Image.fromarray((rng.random((h, w)) * 65535).astype(np.uint16)), 1),
        "bits": (Image.fromarray(rng.random((h, w)) > 0.5).convert("1"), 1),
    }
    mask = np.zeros((h, w), np.uint8)
    mask[4:10, 5:12] = 255
    for name, (picture, channels) in files.items():
        for data in ({"normalize": {"mode": "zscore"}}, {"resize": [12, 30]}):
            root = tmp_path / f"{name}_{len(data)}_{'resize' in data}"
            (root / "images").mkdir(parents=True)
            (root / "masks").mkdir()
            picture.save(root / "images" / f"{name}.png")
            Image.fromarray(mask).save(root / "masks" / f"{name}.png")
            source = _folder_source(root, channels == 1, data)
            assert source.in_channels == channels, name
            trained, _ = source.split("train")[0]
            got = read_image(root / "images" / f"{name}.png", channels, source.normalization,
                             tuple(data["resize"]) if "resize" in data else None)
            assert got.dtype == torch.float32 and got.shape == trained.shape, (name, data)
            torch.testing.assert_close(got, trained, rtol=0, atol=0, msg=f"{name} {data}")


def test_model_identity_stores_resize_and_predict_resizes_both_ways(tmp_path, capsys):
    """A model trained on data.resize images gets the input resized to that size, and its probabilities are
    resized back: the mask equals an independent computation (skimage resize, sigmoid, bilinear back)."""
    from skimage.transform import resize as sk_resize

    from unetlab.deploy.predict import predict_probabilities
    from unetlab.training.model_store import load_trained, model_identity

    config, model = tiny_model(0)
    write_image(tmp_path / "a.png", (50, 61), seed=4)
    raw = io.imread(tmp_path / "a.png")
    native_input = torch.from_numpy(raw.astype(np.float32) / 255)[None]
    with torch.no_grad():  # centre the logits: a mask about half foreground, so input sizes tell apart
        model.head.bias -= model(native_input[None]).median()
    prepared = SimpleNamespace(run=SimpleNamespace(config={"model": config, "data": {"resize": [32, 28]}}),
                               in_channels=1, out_channels=1, source=SimpleNamespace())
    identity = model_identity(prepared)
    assert identity["resize"] == [32, 28] and "normalization" not in identity
    save_atomic({"model": model.state_dict(), **identity}, tmp_path / "resized.pt")
    assert load_trained(str(tmp_path / "resized.pt")).resize == (32, 28)
    assert cli(capsys, "predict", str(tmp_path / "resized.pt"), str(tmp_path / "a.png"), "--out",
               str(tmp_path / "out")).returncode == 0
    mask = io.imread(tmp_path / "out" / "a_mask.png") > 0
    small = np.rint(sk_resize(raw, (32, 28), order=1, preserve_range=True, anti_aliasing=True)) / 255
    probs = predict_probabilities(model, torch.from_numpy(small.astype(np.float32))[None])[0].numpy()
    expected = sk_resize(probs, raw.shape, order=1, mode="edge", anti_aliasing=False) > 0.5
    native = predict_probabilities(model, native_input)[0].numpy() > 0.5
    assert mask.shape == raw.shape
    assert (mask == expected).mean() > 0.99
    assert (native != expected).mean() > 0.2  # the check can fail: the native-size input gives another mask


def test_inputs_whose_masks_share_a_name_are_refused(tmp_path, capsys):
    """Two inputs with one stem would overwrite each other's mask: refused in one line, nothing written."""
    config, model = tiny_model(0)
    ckpt = str(save_checkpoint(tmp_path / "best.pt", config, model))
    for folder in ("a", "b", "c"):
        (tmp_path / folder).mkdir()
    write_image(tmp_path / "a" / "x.png", (16, 16))
    write_image(tmp_path / "b" / "x.png", (16, 16))
    write_image(tmp_path / "c" / "y.png", (16, 16))
    io.imsave(tmp_path / "c" / "y.tif", np.zeros((16, 16), np.uint8), check_contrast=False)
    out = tmp_path / "out"
    for inputs in ([tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"], [tmp_path / "c"]):
        line = one_line_error(cli(capsys, "predict", ckpt, *map(str, inputs), "--out", str(out)))
        assert "would both be written as" in line and all(str(p) in line for p in inputs[:2] if p.is_file()), line
        assert not out.exists()
    # one file named twice (alone and through its folder) is one input
    proc = cli(capsys, "predict", ckpt, str(tmp_path / "a" / "x.png"), str(tmp_path / "a"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["x_mask.png"]
