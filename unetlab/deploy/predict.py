"""``unetlab predict``: apply a trained model to images of any size.

The model is rebuilt from weights (``unetlab.training.model_store``: nothing from a store is unpickled).
Images go through ``unetlab.model.sliding_window.sliding_window_logits``, the same code whole-image validation
uses: same padding blends overlapping windows with a Gaussian; valid padding uses the paper's mirror
overlap-tile; without ``--tile`` an image above ``AUTO_TILE_PIXELS`` pixels is tiled automatically,
so memory stays bounded. Optional test-time augmentation averages the probabilities over flips.
Without flips or ``data.resize`` an image is streamed (``streamed_mask``): normalised window by window,
its logits turned into mask rows band by band, so memory beyond the decoded file and its mask is bounded
by the tile, the window batch and the image's width; with them the whole image's probabilities are held.

A file becomes the model's input exactly as in training (``read_image``: training's reader, grey
conversion, ``data.resize`` and normalisation, all stored with the model); a mask is written at the
input's own size (probabilities of a resized input are resized back, bilinear).

Every input is read and checked before the first mask is written: an unreadable or corrupt file, a
multi-page TIFF (refused: predict reads single images; split the stack into files), an image smaller
than the model accepts, or two inputs whose masks would have the same name stop the command in one
line with nothing written.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from unetlab.data.normalization import check_stored_spec
from unetlab.errors import UnetlabError
from unetlab.model.sliding_window import check_tiling, minimum_input_size, sliding_window_logits
from unetlab.training.model_store import TrainedModel, load_model

__all__ = ["load_model", "predict_files", "predict_probabilities", "read_image", "streamed_mask"]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits) if logits.shape[0] == 1 else torch.softmax(logits, 0)


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, image: torch.Tensor, tile: int | None = None, overlap: int = 32,
                          tta: bool = False, mode: str = "gaussian", batch_size: int = 4) -> torch.Tensor:
    """Per-class probabilities (K x H x W, or 1 x H x W for binary) for one C x H x W image.

    Tiled by ``unetlab.model.sliding_window.sliding_window_logits`` (``tile=None``: whole image up to the automatic
    tiling threshold). With ``tta`` the probabilities are averaged over the four flips.
    """
    model.eval()
    if not tta:
        return _probabilities(sliding_window_logits(model, image, tile, overlap, batch_size=batch_size, mode=mode))
    total: torch.Tensor | None = None
    for dims in ((), (-1,), (-2,), (-2, -1)):
        flipped = image.flip(dims) if dims else image
        probs = _probabilities(sliding_window_logits(model, flipped, tile, overlap, batch_size=batch_size,
                                                     mode=mode))
        probs = probs.flip(dims) if dims else probs
        total = probs if total is None else total + probs
    assert total is not None  # the loop above runs four times
    return total / 4


def read_image(path: Path, channels: int, normalization: dict | None = None,
               resize: tuple[int, int] | None = None) -> torch.Tensor:
    """One image file as the float32 C x H x W tensor the model was trained on.

    The steps are training's own (``unetlab.data.decode_cache``): the same reader (channels kept but a
    declared alpha, 1-bit images as 0/255), the same grey conversion, the same resize (``resize``: data.resize),
    then ``unetlab.data.normalization.apply_normalization`` with the dataset's spec stored with the model
    (without one, integers scale by their type's range: uint8 /255, uint16 /65535; a per-image spec
    takes its statistics from this whole file, as training takes them from the whole image). Multi-page
    TIFFs are refused.
    """
    return _model_input(_decode(path, channels), normalization, resize)


def _decode(path: Path, channels: int) -> np.ndarray:
    """The pixels of ``path`` as H x W x ``channels`` in their own dtype, read as training reads them."""
    from unetlab.data.decode_cache import read_image_file, to_grayscale

    raw = read_image_file(path)  # the reader of training and 'unetlab data': it refuses multi-page files
    if raw.shape[2] == channels:
        return raw
    if channels == 1:
        return to_grayscale(raw)  # what training does with grayscale: true
    if raw.shape[2] == 1:
        return np.repeat(raw, channels, axis=2)
    raise UnetlabError(f"'{path}' has {raw.shape[2]} channels: this model takes {channels} (or 1, repeated)")


def _model_input(raw: np.ndarray, normalization: dict | None, resize: tuple[int, int] | None) -> torch.Tensor:
    from unetlab.data.decode_cache import resize_image
    from unetlab.data.normalization import apply_normalization, dtype_spec

    if resize:
        raw = resize_image(raw, resize)
    spec = normalization if normalization is not None else dtype_spec(raw.dtype, raw.shape[2])
    return torch.from_numpy(apply_normalization(raw, spec))


def _inputs(paths: Iterable[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise UnetlabError(f"input '{p}' does not exist")
    if not files:
        raise UnetlabError("no input images found (png, tif, jpg, bmp)")
    unique: dict[Path, Path] = {}
    for f in files:
        unique.setdefault(f.resolve(), f)  # a file named twice (alone and in its folder) is predicted once
    seen: dict[str, Path] = {}
    for f in unique.values():
        other = seen.setdefault(f.stem.casefold(), f)  # casefold: one mask file on case-insensitive disks too
        if other is not f:
            raise UnetlabError(f"'{other}' and '{f}' would both be written as {f.stem}_mask.png: rename one, or "
                               "predict them into different --out folders")
    return list(unique.values())


def _minimum_image_side(model: torch.nn.Module, channels: int) -> int:
    """Same padding: the smallest input the model accepts. Valid padding mirrors any image to the tile,
    so the floor is the encoder's total downsampling (one pixel at the coarsest level)."""
    if getattr(model, "padding", "same") == "valid":
        return int(list(getattr(getattr(model, "encoder", None), "strides", [1]))[-1])
    return minimum_input_size(model, channels)


def _check_inputs(files: list[Path], model: torch.nn.Module, trained: TrainedModel) -> None:
    """Turn every input into the model's input once and check its size, so that nothing is written when one
    is bad."""
    from unetlab.data.normalization import dtype_spec

    minimum = _minimum_image_side(model, trained.in_channels)
    for path in files:
        raw = _decode(path, trained.in_channels)  # decoded, not normalised: a float copy would cost 4x the file
        if trained.normalization is None:
            dtype_spec(raw.dtype, raw.shape[2])  # refuses a dtype without a default scale before anything is written
        height, width = trained.resize or raw.shape[:2]
        del raw
        if min(height, width) < minimum:
            size = f"resized to {height}x{width} (the model's data.resize)" if trained.resize else \
                f"{height}x{width}"
            raise UnetlabError(f"'{path}' is {size}: this model needs images of at least "
                               f"{minimum}x{minimum} pixels")


def predict_files(model_spec: str, inputs: list[str], out_dir: str, tile: int | None, overlap: int, tta: bool,
                  overlay: bool, tracking_uri: str | None = None) -> list[Path]:
    """Predict a mask for every input image and write it (and optionally an overlay) under ``out_dir``.

    All inputs, the tile and the overlap are checked first: on any problem nothing is written.
    """
    from skimage import io

    from unetlab.training.model_store import load_trained

    if tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
    files = _inputs(inputs)
    trained = load_trained(model_spec)
    check_stored_spec(trained.normalization, trained.source)
    model, channels = trained.model, trained.in_channels
    check_tiling(model, channels, tile, overlap)
    _check_inputs(files, model, trained)
    if torch.cuda.is_available():
        model = model.cuda()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    iterator = files
    if sys.stderr.isatty():
        from tqdm import tqdm

        iterator = tqdm(files, desc="predict", unit="image", file=sys.stderr)
    binary = trained.out_channels == 1
    for path in iterator:
        raw = _decode(path, channels)
        if trained.resize is None and not tta:
            mask = streamed_mask(model, raw, trained.normalization, tile, overlap)
        else:  # flips and resizing back need the probabilities of the whole image
            image = _model_input(raw, trained.normalization, trained.resize)
            mask = _mask(_to_size(predict_probabilities(model, image, tile, overlap, tta), raw.shape[:2]))
        target = out / f"{path.stem}_mask.png"
        io.imsave(target, mask, check_contrast=False)
        written.append(target)
        if overlay:
            shown = _model_input(raw, trained.normalization, None)
            io.imsave(out / f"{path.stem}_overlay.png", _overlay(shown, mask, binary), check_contrast=False)
    return written


def _mask(probs: torch.Tensor) -> np.ndarray:
    """Probabilities (K x h x W) -> mask rows: 0/255 for binary (> 0.5), else the class index."""
    if probs.shape[0] == 1:
        return ((probs[0] > 0.5).numpy() * 255).astype(np.uint8)
    return probs.argmax(0).numpy().astype(np.uint8)


@torch.no_grad()
def streamed_mask(model: torch.nn.Module, raw: np.ndarray, normalization: dict | None, tile: int | None = None,
                  overlap: int = 32) -> np.ndarray:
    """The mask (H x W uint8) of one raw H x W x C image, streamed: the image is normalised window by window
    and its logits arrive in row bands (``unetlab.model.sliding_window.stream_logits``), each turned into mask rows and
    dropped, so memory beyond the decoded file and the mask is bounded by the tile, the batch and the width.
    The mask equals ``predict_probabilities`` on the whole normalised image thresholded as predict does."""
    from unetlab.data.normalization import dtype_spec, image_spec
    from unetlab.model.sliding_window import ArrayWindows, stream_logits

    spec = normalization if normalization is not None else dtype_spec(raw.dtype, raw.shape[2])
    windows = ArrayWindows(raw, image_spec(spec, raw))
    mask = np.empty(raw.shape[:2], np.uint8)
    model.eval()
    for top, band in stream_logits(model, windows, tile, overlap, device=next(model.parameters()).device):
        rows = _mask(_probabilities(band.cpu()))
        mask[top:top + rows.shape[0]] = rows
    return mask


def _to_size(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Probabilities of a resized input brought back to the input's own size (bilinear)."""
    if tuple(probs.shape[-2:]) == tuple(size):
        return probs
    import torch.nn.functional as F

    return F.interpolate(probs[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]


def _overlay(image: torch.Tensor, mask: np.ndarray, binary: bool) -> np.ndarray:
    rgb = image.numpy().transpose(1, 2, 0)
    rgb = np.repeat(rgb, 3, axis=2) if rgb.shape[2] == 1 else rgb[..., :3]
    if rgb.min() < 0 or rgb.max() > 1:  # a dataset normalisation (z-score...) leaves [0, 1]: stretch for display
        rgb = (rgb - rgb.min()) / max(float(rgb.max() - rgb.min()), 1e-8)
    classes = (mask > 127).astype(int) if binary else mask.astype(int)
    colours = np.array([[0, 0, 0], [1, 0.2, 0.2], [0.2, 1, 0.2], [0.2, 0.4, 1], [1, 1, 0.2], [1, 0.2, 1]])
    tinted = np.where(classes[..., None] > 0, 0.5 * rgb + 0.5 * colours[classes % len(colours)], rgb)
    return (np.clip(tinted, 0, 1) * 255).astype(np.uint8)
