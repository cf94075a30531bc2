"""``unetlab predict``: apply a trained model to images of any size.

The model is rebuilt from weights (``unetlab.model_store``: nothing from a store is unpickled).
Images go through ``unetlab.inference.sliding_window_logits``, the same code whole-image validation
uses: same padding blends overlapping windows with a Gaussian; valid padding uses the paper's mirror
overlap-tile; without ``--tile`` an image above ``AUTO_TILE_PIXELS`` pixels is tiled automatically,
so memory stays bounded. Optional test-time augmentation averages the probabilities over flips.

Every input is read and checked before the first mask is written: an unreadable or corrupt file, a
multi-page TIFF (refused: predict reads single images; split the stack into files) or an image smaller
than the model accepts stops the command in one line with nothing written.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from .errors import UnetlabError, exception_text
from .inference import check_tiling, minimum_input_size, sliding_window_logits
from .model_store import load_model

__all__ = ["load_model", "predict_files", "predict_probabilities", "read_image"]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits) if logits.shape[0] == 1 else torch.softmax(logits, 0)


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, image: torch.Tensor, tile: int | None = None, overlap: int = 32,
                          tta: bool = False, mode: str = "gaussian", batch_size: int = 4) -> torch.Tensor:
    """Per-class probabilities (K x H x W, or 1 x H x W for binary) for one C x H x W image.

    Tiled by ``unetlab.inference.sliding_window_logits`` (``tile=None``: whole image up to the automatic
    tiling threshold). With ``tta`` the probabilities are averaged over the four flips.
    """
    model.eval()
    if not tta:
        return _probabilities(sliding_window_logits(model, image, tile, overlap, batch_size=batch_size, mode=mode))
    total = None
    for dims in ((), (-1,), (-2,), (-2, -1)):
        flipped = image.flip(dims) if dims else image
        probs = _probabilities(sliding_window_logits(model, flipped, tile, overlap, batch_size=batch_size,
                                                     mode=mode))
        probs = probs.flip(dims) if dims else probs
        total = probs if total is None else total + probs
    return total / 4


def read_image(path: Path, channels: int, normalization: dict | None = None) -> torch.Tensor:
    """One image file as a float32 C x H x W tensor, normalised as the model was trained.

    ``normalization`` is the dataset's spec stored with the model (``unetlab.normalization``); without
    one, integer images are scaled by their type's range (uint8 /255, uint16 /65535). Multi-page TIFFs
    are refused.
    """
    raw = _decode(path)
    if raw.ndim == 3 and raw.shape[2] == 4:
        raw = raw[..., :3]  # drop alpha
    if raw.ndim == 2:
        raw = raw[..., None]
    if raw.shape[2] != channels:
        if channels == 1:
            raw = raw.mean(axis=2, keepdims=True).astype(raw.dtype)
        else:
            raw = np.repeat(raw[..., :1], channels, axis=2)
    if normalization is not None:
        from .normalization import apply_normalization

        return torch.from_numpy(np.ascontiguousarray(apply_normalization(raw, normalization)))
    array = raw.astype(np.float32)
    if raw.dtype == np.uint8:
        array /= 255.0
    elif raw.dtype == np.uint16:
        array /= 65535.0
    elif raw.dtype != np.bool_:
        array /= 65535.0 if array.max() > 255 else 255.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _decode(path: Path) -> np.ndarray:
    """The pixels of ``path`` (H x W or H x W x C); one-line errors for unreadable files and stacks."""
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                pages = len(tif.pages)
                if pages > 1:
                    raise UnetlabError(f"'{path}' is a multi-page TIFF ({pages} pages): predict reads single "
                                       "images; save each page as its own file")
                array = tif.asarray()
        except UnetlabError:
            raise
        except Exception as exc:  # noqa: BLE001 -- any library error becomes one line
            raise UnetlabError(f"cannot read image '{path}': {exception_text(exc)}") from None
    else:
        from skimage import io

        try:
            array = np.asarray(io.imread(path))
        except Exception as exc:  # noqa: BLE001 -- any library error becomes one line
            raise UnetlabError(f"cannot read image '{path}': {exception_text(exc)}") from None
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] > 4) or array.size == 0:
        raise UnetlabError(f"'{path}' has pixel array shape {array.shape}: expected H x W or H x W x C "
                           "(C = 1, 3 or 4)")
    return array


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
    return files


def _minimum_image_side(model: torch.nn.Module, channels: int) -> int:
    """Same padding: the smallest input the model accepts. Valid padding mirrors any image to the tile,
    so the floor is the encoder's total downsampling (one pixel at the coarsest level)."""
    if getattr(model, "padding", "same") == "valid":
        return int(list(getattr(getattr(model, "encoder", None), "strides", [1]))[-1])
    return minimum_input_size(model, channels)


def _check_inputs(files: list[Path], model: torch.nn.Module, channels: int, normalization: dict | None) -> None:
    """Decode every input once and check its size, so that nothing is written when one is bad."""
    minimum = _minimum_image_side(model, channels)
    for path in files:
        height, width = read_image(path, channels, normalization).shape[-2:]
        if min(height, width) < minimum:
            raise UnetlabError(f"'{path}' is {height}x{width}: this model needs images of at least "
                               f"{minimum}x{minimum} pixels")


def predict_files(model_spec: str, inputs: list[str], out_dir: str, tile: int | None, overlap: int, tta: bool,
                  overlay: bool, tracking_uri: str | None = None) -> list[Path]:
    """Predict a mask for every input image and write it (and optionally an overlay) under ``out_dir``.

    All inputs, the tile and the overlap are checked first: on any problem nothing is written.
    """
    from skimage import io

    from .model_store import load_trained

    if tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
    files = _inputs(inputs)
    trained = load_trained(model_spec)
    model, channels, normalization = trained.model, trained.in_channels, trained.normalization
    check_tiling(model, channels, tile, overlap)
    _check_inputs(files, model, channels, normalization)
    if torch.cuda.is_available():
        model = model.cuda()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    iterator = files
    if sys.stderr.isatty():
        from tqdm import tqdm

        iterator = tqdm(files, desc="predict", unit="image", file=sys.stderr)
    for path in iterator:
        image = read_image(path, channels, normalization)
        probs = predict_probabilities(model, image, tile, overlap, tta)
        if probs.shape[0] == 1:
            mask = ((probs[0] > 0.5).numpy() * 255).astype(np.uint8)
        else:
            mask = probs.argmax(0).numpy().astype(np.uint8)
        target = out / f"{path.stem}_mask.png"
        io.imsave(target, mask, check_contrast=False)
        written.append(target)
        if overlay:
            io.imsave(out / f"{path.stem}_overlay.png", _overlay(image, mask, probs.shape[0] == 1),
                      check_contrast=False)
    return written


def _overlay(image: torch.Tensor, mask: np.ndarray, binary: bool) -> np.ndarray:
    rgb = image.numpy().transpose(1, 2, 0)
    rgb = np.repeat(rgb, 3, axis=2) if rgb.shape[2] == 1 else rgb[..., :3]
    if rgb.min() < 0 or rgb.max() > 1:  # a dataset normalisation (z-score...) leaves [0, 1]: stretch for display
        rgb = (rgb - rgb.min()) / max(float(rgb.max() - rgb.min()), 1e-8)
    classes = (mask > 127).astype(int) if binary else mask.astype(int)
    colours = np.array([[0, 0, 0], [1, 0.2, 0.2], [0.2, 1, 0.2], [0.2, 0.4, 1], [1, 1, 0.2], [1, 0.2, 1]])
    tinted = np.where(classes[..., None] > 0, 0.5 * rgb + 0.5 * colours[classes % len(colours)], rgb)
    return (np.clip(tinted, 0, 1) * 255).astype(np.uint8)
