"""Per-image normalisation (``data.normalize.scope: image``): statistics of each WHOLE image, checked against
numpy on the image, in what training feeds the model (whole images, patches, tiles), through ``unetlab run``
and ``unetlab predict`` (the same probabilities as validation, bit for bit), and older checkpoints without a
scope still read as per dataset."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import unetlab
from unetlab.checkpoint import save_atomic
from unetlab.data.normalization import apply_normalization, check_normalize, image_statistics
from unetlab.data.options import configure_source

from conftest import one_line_error


def folder(root: Path, data: dict, **params):
    source = unetlab.create("dataset", "folder", root=str(root), **params)
    return configure_source(source, data, "folder")


def write_pair(root: Path, stem: str, image: np.ndarray, mask: np.ndarray) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(root / "images" / f"{stem}.tif", image)
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png")


def pool(root: Path, sizes, seed: int = 0, dtype=np.uint16) -> dict[str, np.ndarray]:
    """Images whose brightness differs a lot between images (gain 1x..20x), each with a square of foreground."""
    rng = np.random.default_rng(seed)
    raw = {}
    for k, (h, w) in enumerate(sizes):
        gain = 1 + 19 * k / max(len(sizes) - 1, 1)
        image = (rng.random((h, w)) * 100 * gain).astype(dtype)
        mask = np.zeros((h, w), np.uint8)
        mask[2:h // 2, 3:w // 2] = 255
        image[mask > 0] += np.asarray(50 * gain, dtype=dtype)
        write_pair(root, f"i{k}", image, mask)
        raw[f"i{k}"] = image
    return raw


def hand(image: np.ndarray, mode: str, lower: float = 1, upper: float = 99.8) -> np.ndarray:
    """The reference: numpy statistics of the whole image (float64), applied to every pixel."""
    x = image.astype(np.float64)
    if mode == "zscore":
        return (x - x.mean()) / x.std()
    low, high = np.percentile(x, [lower, upper])
    return (np.clip(x, low, high) - low) / (high - low)


def test_image_statistics_equal_numpy_for_integer_and_float_images(monkeypatch):
    """The histogram (integers) and banded (floats) statistics equal numpy's on the whole image, also when
    the image is read in many row bands."""
    import unetlab.data.normalization as norm

    monkeypatch.setattr(norm, "BAND_PIXELS", 37)  # many bands of a few rows
    rng = np.random.default_rng(3)
    images = [(rng.random((23, 17, 3)) * 255).astype(np.uint8), (rng.random((19, 21, 2)) * 65535).astype(np.uint16),
              (rng.normal(0, 3000, (15, 13, 1))).astype(np.int16), rng.normal(5, 2, (17, 11, 2)).astype(np.float32)]
    for image in images:
        x = image.astype(np.float64)
        mean, std = image_statistics(image, "zscore")
        np.testing.assert_allclose(mean, x.mean((0, 1)), rtol=1e-12)
        np.testing.assert_allclose(std, x.std((0, 1)), rtol=1e-10)
        q = image_statistics(image, "percentile", (1, 99.8))
        np.testing.assert_allclose(q, np.percentile(x.reshape(-1, x.shape[2]), [1, 99.8], axis=0), rtol=1e-12)


def test_the_config_key_is_checked_in_one_line_with_a_suggestion():
    assert check_normalize({"mode": "zscore"}) == {"mode": "zscore"}  # per dataset: the spec as before
    assert check_normalize({"mode": "zscore", "scope": "image"}) == {"mode": "zscore", "scope": "image"}
    with pytest.raises(unetlab.UnetlabError, match=r"data.normalize.scope: 'imgae' is not a scope; did you mean "
                                                     r"'image'\?"):
        check_normalize({"mode": "percentile", "scope": "imgae"})
    with pytest.raises(unetlab.UnetlabError, match=r"data.normalize.scop: not a key of mode zscore; did you mean "
                                                     r"'scope'\?"):
        check_normalize({"mode": "zscore", "scop": "image"})
    with pytest.raises(unetlab.UnetlabError, match=r"data.normalize.scope: not a key of mode fixed"):
        check_normalize({"mode": "fixed", "mean": 0, "std": 1, "scope": "image"})


def test_unetlab_run_refuses_a_bad_scope_before_any_run(tmp_path):
    pool(tmp_path / "data", [(16, 16)] * 4)
    exp = tmp_path / "exp.yaml"
    exp.write_text(textwrap.dedent(f"""
        data: {{dataset: {{name: folder, root: data}}, normalize: {{mode: zscore, scope: imgae}}}}
        model: {{encoder: {{name: classic, depth: 2, base_channels: 4}}}}
        train: {{epochs: 1}}
        tracking: {{uri: 'sqlite:///{tmp_path / "m.db"}', log_model: false, figures: false}}
    """))
    import sys

    proc = subprocess.run([sys.executable, "-m", "unetlab", "run", str(exp), "--quiet"], cwd=tmp_path, text=True,
                          capture_output=True, timeout=300)
    line = one_line_error(proc)
    assert "data.normalize.scope" in line and "did you mean 'image'" in line, line
    assert not (tmp_path / "m.db").exists() or "RUNNING" not in proc.stdout


@pytest.mark.parametrize("mode", ["zscore", "percentile"])
def test_training_inputs_are_normalised_by_the_whole_image_statistics(tmp_path, mode):
    """Same-size images (held as tensors), and patches, tiles and whole images of varied sizes: every value
    the model is fed equals numpy's per-image normalisation of the whole image."""
    options = {"mode": mode, "scope": "image", **({"lower": 1, "upper": 99.8} if mode == "percentile" else {})}
    raw = pool(tmp_path / "same", [(20, 24)] * 4)
    src = folder(tmp_path / "same", {"normalize": options}, val_fraction=0.0)
    assert src.normalization["scope"] == "image" and "offset" not in src.normalization
    tensors = src.split("train").tensors[0]
    for k, stem in enumerate(sorted(raw)):
        np.testing.assert_allclose(tensors[k, 0].numpy(), hand(raw[stem], mode), rtol=1e-5, atol=1e-5)
    # per-image really is per image: the per-dataset spec gives other inputs
    dataset_scope = folder(tmp_path / "same", {"normalize": {k: v for k, v in options.items() if k != "scope"}},
                           val_fraction=0.0)
    assert not torch.allclose(dataset_scope.split("train").tensors[0], tensors, atol=1e-2)

    raw = pool(tmp_path / "mixed", [(20, 24), (31, 17), (26, 40), (18, 18)], seed=1)
    src = folder(tmp_path / "mixed", {"normalize": options, "patch_size": [8, 8]}, val_fraction=0.5, seed=0)
    for split in ("train", "val"):
        whole = src.whole_images(split)
        for k, stem in enumerate(whole.names):
            expected = hand(raw[stem], mode)
            np.testing.assert_allclose(whole[k][0][0].numpy(), expected, rtol=1e-5, atol=1e-5)
            h, w = expected.shape
            # a tile reads 8 x 8 windows (padded with 0 past the image): the whole image's statistics
            padded = np.zeros((h + 8, w + 8), np.float32)
            padded[:h, :w] = expected
            for top, left in ((0, 0), (8, 8), (h - 5, w - 3)):
                tile = whole.store.read(k, top, left, (8, 8))[0][0].numpy()
                np.testing.assert_allclose(tile, padded[top:top + 8, left:left + 8], rtol=1e-5, atol=1e-5)
    # the training patches (PatchDataset, what the DataLoader yields) are windows of the normalised whole image
    train = src.split("train")
    for k in range(len(train)):
        patch = train[(k, 1234 + k)][0][0].numpy()
        expected = hand(raw[train.store.names[k]], mode)
        h, w = expected.shape
        found = any(np.allclose(patch, expected[t:t + 8, l:l + 8], atol=1e-5)
                    for t in range(h - 7) for l in range(w - 7))
        assert found, train.store.names[k]


def test_per_image_normalisation_round_trips_through_run_and_predict_bit_for_bit(tmp_path, capsys):
    """``unetlab run`` on patches with per-image percentiles stores the scope in its checkpoint; ``predict``
    of a validation file gives probabilities equal, bit for bit, to the validation path's on that image with
    the same weights, and its mask scores the checkpoint's validation value."""
    from sklearn.metrics import jaccard_score

    from unetlab.cli.main import main as cli_main
    from unetlab.deploy.predict import predict_probabilities, read_image
    from unetlab.training.model_store import load_trained
    from unetlab.training.whole_image_validation import whole_image_logits

    raw = pool(tmp_path / "data", [(24, 24), (40, 36), (28, 44), (32, 32), (36, 26), (30, 30)], seed=2)
    exp = tmp_path / "exp.yaml"
    exp.write_text(textwrap.dedent(f"""
        data: {{dataset: {{name: folder, root: data, val_fraction: 0.34}}, patch_size: [16, 16], batch_size: 2,
                normalize: {{mode: percentile, lower: 1, upper: 99.8, scope: image}}}}
        model: {{encoder: {{name: classic, depth: 2, base_channels: 4}}}}
        train: {{epochs: 1, lr: 0.01}}
        tracking: {{uri: 'sqlite:///{tmp_path / "m.db"}', checkpoint_dir: '{tmp_path / "ckpt"}',
                   log_model: false, figures: false}}
    """))
    assert cli_main(["run", str(exp), "--quiet"]) == 0, capsys.readouterr().err
    best = next((tmp_path / "ckpt").rglob("best.pt"))
    checkpoint = torch.load(best, weights_only=True)
    assert checkpoint["normalization"] == {"mode": "percentile", "scope": "image", "channels": 1, "clip": None,
                                           "percentiles": [1.0, 99.8]}
    trained = load_trained(str(best))
    source = folder(tmp_path / "data", {"patch_size": [16, 16], "normalize": {"mode": "percentile", "lower": 1,
                                                                              "upper": 99.8, "scope": "image"}},
                    val_fraction=0.34)
    val = source.whole_images("val")
    files = [tmp_path / "data" / "images" / f"{stem}.tif" for stem in val.names]
    assert cli_main(["predict", str(best), *map(str, files), "--out", str(tmp_path / "pred")]) == 0
    truth, predicted = [], []
    for k, path in enumerate(files):
        image, mask = val[k]
        validation_probs = torch.sigmoid(whole_image_logits(trained.model, image, torch.device("cpu"))[0])
        predict_input = read_image(path, 1, trained.normalization)
        assert torch.equal(predict_input, image)
        assert torch.equal(predict_probabilities(trained.model, predict_input), validation_probs)
        written = np.asarray(Image.open(tmp_path / "pred" / f"{path.stem}_mask.png")) > 0
        np.testing.assert_array_equal(written, (validation_probs[0] > 0.5).numpy())
        truth.append(mask.numpy().ravel())
        predicted.append(written.ravel())
        np.testing.assert_allclose(image[0].numpy(), hand(raw[path.stem], "percentile"), rtol=1e-5, atol=1e-5)
    assert checkpoint["value"] == pytest.approx(jaccard_score(np.concatenate(truth), np.concatenate(predicted)),
                                                abs=1e-9)


def test_a_checkpoint_without_scope_is_per_dataset_and_a_bad_stored_spec_is_one_line(tmp_path, capsys):
    """A spec written before scopes existed (offset/scale, no scope) is applied as per-dataset statistics;
    a spec read back with an unknown scope or missing statistics is refused in one line, nothing written."""
    from unetlab.cli.main import main as cli_main
    from unetlab.deploy.predict import read_image
    from unetlab.model.unet import build_unet
    from unetlab.training.model_store import load_trained

    registry = unetlab.default_host().registry

    def spec(kind, name, **p):
        return {"name": name, **registry.get(kind, name).defaults(), **p}

    config = {"encoder": spec("encoder", "classic", depth=2, base_channels=4), "upsampler": spec("upsampler",
              "bilinear"), "fusion": spec("fusion", "concat"), "block": spec("block", "double_conv"),
              "init": spec("initializer", "default"), "decoder_channels": None}
    model = build_unet(config, 1, 1, registry)
    old = {"mode": "zscore", "offset": [300.0], "scale": [40.0], "clip": None}  # as written by older versions
    save_atomic({"model": model.state_dict(), "model_config": config, "in_channels": 1, "out_channels": 1,
                 "normalization": old}, tmp_path / "old.pt")
    image = (np.random.default_rng(0).random((20, 20)) * 1000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", image)
    trained = load_trained(str(tmp_path / "old.pt"))
    np.testing.assert_allclose(read_image(tmp_path / "a.tif", 1, trained.normalization)[0].numpy(),
                               (image - 300.0) / 40.0, rtol=1e-6)
    assert cli_main(["predict", str(tmp_path / "old.pt"), str(tmp_path / "a.tif"), "--out",
                     str(tmp_path / "out")]) == 0
    for bad in ({"mode": "zscore", "scope": "tile", "channels": 1}, {"mode": "zscore", "offset": [1.0]},
                {"mode": "percentile", "scope": "image", "channels": 1, "percentiles": [50, 10]}):
        save_atomic({"model": model.state_dict(), "model_config": config, "in_channels": 1, "out_channels": 1,
                     "normalization": bad}, tmp_path / "bad.pt")
        capsys.readouterr()
        code = cli_main(["predict", str(tmp_path / "bad.pt"), str(tmp_path / "a.tif"), "--out",
                         str(tmp_path / "bad_out")])
        err = capsys.readouterr().err
        proc = subprocess.CompletedProcess([], code, "", err)
        assert "normalization" in one_line_error(proc) and not (tmp_path / "bad_out").exists()


def test_apply_normalization_refuses_a_per_image_spec_of_other_channels():
    spec = {"mode": "zscore", "scope": "image", "channels": 3, "clip": None}
    with pytest.raises(unetlab.UnetlabError, match="1 channel"):
        apply_normalization(np.zeros((4, 4), np.uint8), spec)
    image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    out = apply_normalization(image, spec)
    x = image.astype(np.float64)
    np.testing.assert_allclose(out, ((x - x.mean((0, 1))) / x.std((0, 1))).transpose(2, 0, 1), rtol=1e-6)
