"""Channels are data (issue 24, item 3): a 2- or 4-channel image keeps every channel in ``unetlab data``,
training and ``unetlab predict``, which read a file through one reader; only an alpha the file format
declares is dropped; a multi-page TIFF is refused by all three with the same line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import unetlab
from unetlab.cli.main import main as cli_main
from unetlab.data.decode_cache import read_image_file
from unetlab.data.options import configure_source
from unetlab.deploy.predict import read_image

RNG = np.random.default_rng(5)
H, W = 12, 14
RGB = (RNG.random((H, W, 3)) * 255).astype(np.uint8)
TWO = (RNG.random((H, W, 2)) * 65535).astype(np.uint16)
FOUR = (RNG.random((H, W, 4)) * 255).astype(np.uint8)
GREY = (RNG.random((H, W)) * 255).astype(np.uint8)


def write(path: Path, kind: str) -> np.ndarray:
    """Write ``path`` as ``kind``; return the pixels the reader must give (H x W x C)."""
    if kind == "tiff_2ch_contig":
        tifffile.imwrite(path, TWO, photometric="minisblack", planarconfig="contig")
        return TWO
    if kind == "tiff_2ch_planar":
        tifffile.imwrite(path, np.moveaxis(TWO, -1, 0), photometric="minisblack", planarconfig="separate")
        return TWO
    if kind == "tiff_2ch_imagej":  # an ImageJ hyperstack: channels stored as pages, declared as channels
        tifffile.imwrite(path, np.moveaxis(TWO, -1, 0), imagej=True, metadata={"axes": "CYX"})
        return TWO
    if kind == "tiff_4ch_unspecified":  # four samples, ExtraSamples = unspecified data: all four are data
        tifffile.imwrite(path, FOUR, photometric="minisblack", planarconfig="contig")
        return FOUR
    if kind == "tiff_rgb_extra_unspecified":
        tifffile.imwrite(path, FOUR, photometric="rgb", extrasamples=[0])
        return FOUR
    if kind == "tiff_rgba":  # ExtraSamples = unassociated alpha
        tifffile.imwrite(path, FOUR, photometric="rgb", extrasamples=[2])
        return FOUR[..., :3]
    if kind == "tiff_rgba_associated":
        tifffile.imwrite(path, FOUR, photometric="rgb", extrasamples=[1])
        return FOUR[..., :3]
    if kind == "png_rgba":
        Image.fromarray(np.dstack([RGB, GREY])).save(path)
        assert Image.open(path).mode == "RGBA"
        return RGB
    if kind == "png_la":
        Image.fromarray(np.dstack([GREY, 255 - GREY])).convert("LA").save(path)
        assert Image.open(path).mode == "LA"
        return GREY[..., None]
    raise AssertionError(kind)


KINDS = ["tiff_2ch_contig", "tiff_2ch_planar", "tiff_2ch_imagej", "tiff_4ch_unspecified",
         "tiff_rgb_extra_unspecified", "tiff_rgba", "tiff_rgba_associated", "png_rgba", "png_la"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_reader_keeps_channels_and_drops_only_a_declared_alpha(tmp_path, kind):
    path = tmp_path / ("a.png" if kind.startswith("png") else "a.tif")
    expected = write(path, kind)
    got = read_image_file(path)
    assert got.dtype == expected.dtype and np.array_equal(got, expected)


def write_tiff_experiment(tmp_path, name, image):
    """Three 2-channel TIFFs (``image(i)``, written contiguous) with PNG masks under tmp_path/data, and a
    one-epoch experiment file ``name`` on them; returns (data root, experiment path)."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    mask = np.zeros((H, W), np.uint8)
    mask[3:8, 4:10] = 255
    for i in range(3):
        tifffile.imwrite(root / "images" / f"t{i}.tif", image(i), photometric="minisblack", planarconfig="contig")
        Image.fromarray(mask).save(root / "masks" / f"t{i}.png")
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"""\
name: {name}
data: {{dataset: {{name: folder, root: data, val_fraction: 0.34}}, batch_size: 2}}
model: {{encoder: {{name: classic, depth: 2, base_channels: 4}}}}
train: {{epochs: 1}}
tracking: {{uri: sqlite:///{tmp_path / 'mlflow.db'}, log_model: false, figures: false}}
""")
    return root, exp


def test_data_training_and_predict_read_a_two_channel_tiff_alike(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # checkpoints go under ./.unetlab
    root, exp = write_tiff_experiment(tmp_path, "channels", lambda i: np.roll(TWO, i, axis=0))
    assert cli_main(["data", str(exp)]) == 0
    out = capsys.readouterr().out
    assert "images: 2 channel(s), uint16" in out and "no problems found" in out

    assert cli_main(["run", str(exp), "--quiet"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    (best,) = (tmp_path / ".unetlab").rglob("best.pt")
    checkpoint = torch.load(best, weights_only=True)
    first = next(v for k, v in checkpoint["model"].items() if v.ndim == 4)  # the first convolution's weight
    assert first.shape[1] == 2 and checkpoint["in_channels"] == 2  # built for, and trained on, both channels

    source = unetlab.create("dataset", "folder", root=str(root), val_fraction=0.0)
    configure_source(source, {}, "folder")
    trained = source.split("train")
    for index, name in enumerate(trained.names):
        predicted = read_image(root / "images" / f"{name}.tif", 2, source.normalization)
        assert predicted.shape == (2, H, W)
        assert torch.equal(predicted, trained[index][0])  # predict's input is training's, bit for bit
    assert cli_main(["predict", str(best), str(root / "images"), "--out", str(tmp_path / "pred")]) == 0
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["t0_mask.png", "t1_mask.png", "t2_mask.png"]


def test_a_multi_page_tiff_is_refused_alike_by_data_training_and_predict(tmp_path, capsys, monkeypatch):
    """Pages without a declared channel axis (a stack, or an H x W x 2 array written without
    planarconfig, which TIFF stores as H pages of W x 2) are refused in one line by all three."""
    monkeypatch.chdir(tmp_path)
    root, exp = write_tiff_experiment(tmp_path, "pages", lambda i: TWO)
    assert cli_main(["run", str(exp), "--quiet"]) == 0, capsys.readouterr().err
    (best,) = (tmp_path / ".unetlab").rglob("best.pt")
    capsys.readouterr()
    stack = root / "images" / "t1.tif"
    tifffile.imwrite(stack, np.moveaxis(TWO, -1, 0))  # two pages, no channel axis declared
    unplanned = tmp_path / "hwc.tif"
    tifffile.imwrite(unplanned, TWO)  # tifffile's default: 12 pages of 14 x 2
    expected = f"'{stack}' is a multi-page TIFF (2 pages"

    assert cli_main(["data", str(exp)]) == 2
    captured = capsys.readouterr()
    assert expected in captured.out and "Traceback" not in captured.err
    assert cli_main(["run", str(exp), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1
    for path, pages in ((stack, 2), (unplanned, 12)):
        assert cli_main(["predict", str(best), str(path), "--out", str(tmp_path / "pred")]) == 2
        err = capsys.readouterr().err
        assert f"'{path}' is a multi-page TIFF ({pages} pages" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "pred").exists()
    # the same pages declared as ImageJ channels are one 2-channel image
    tifffile.imwrite(stack, np.moveaxis(TWO, -1, 0), imagej=True, metadata={"axes": "CYX"})
    assert np.array_equal(read_image_file(stack), TWO)
    assert cli_main(["predict", str(best), str(stack), "--out", str(tmp_path / "pred")]) == 0
