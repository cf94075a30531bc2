"""``unetlab predict``: apply a trained model to images of any size.

Large images are tiled. With ``same`` padding, overlapping tiles are blended with a smooth weight
window (a Hann window, floored so edges still count), so seams do not show. With ``valid`` padding,
the U-Net paper's overlap-tile strategy: the image is mirror-padded by the model's margin, and each
tile's (smaller) output covers its own region exactly, so the mask covers the whole image.
Optional test-time augmentation averages the probabilities over flips.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UnetlabError, exception_text

__all__ = ["load_model", "predict_probabilities", "predict_files"]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


def load_model(spec: str) -> torch.nn.Module:
    """A trained model from a checkpoint path, an MLflow run id, or a ``runs:/`` / ``models:/`` URI."""
    path = Path(spec)
    if path.suffix == ".pt" or path.is_file():
        from .checkpoint import load_checkpoint
        from .model import build_unet
        from .plugins import default_host

        if not path.is_file():
            raise UnetlabError(f"checkpoint '{spec}' not found")
        state = load_checkpoint(path)
        if "model_config" not in state:
            raise UnetlabError(f"checkpoint '{spec}' has no model description (written by an older unetlab?)")
        model = build_unet(state["model_config"], state["in_channels"], state["out_channels"],
                           default_host().registry)
        model.load_state_dict(state["model"])
        return model.eval()
    import mlflow
    import mlflow.pytorch

    uri = spec
    if not spec.startswith(("runs:/", "models:/")):
        try:
            run = mlflow.tracking.MlflowClient().get_run(spec)
        except Exception:
            raise UnetlabError(f"'{spec}' is neither a checkpoint file, an MLflow run id of this store "
                               f"({mlflow.get_tracking_uri()}) nor a runs:/ or models:/ URI") from None
        uri = run.data.tags.get("unetlab.model_uri")
        if not uri:
            raise UnetlabError(f"run {spec} has no logged model (was tracking.log_model off, or did it fail?)")
    try:
        return mlflow.pytorch.load_model(uri, map_location="cpu").eval()
    except Exception as exc:
        raise UnetlabError(f"cannot load model '{uri}': {exception_text(exc)}") from None


def _window(height: int, width: int) -> torch.Tensor:
    def hann(n: int) -> torch.Tensor:
        return torch.hann_window(n + 2, periodic=False)[1:-1] if n > 1 else torch.ones(1)
    return (torch.outer(hann(height), hann(width)) + 1e-3)


def _starts(size: int, tile: int, step: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, step)) + [size - tile]
    return sorted(set(starts))


def _probabilities(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model(x).float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, 1)


def _tta(model: torch.nn.Module, x: torch.Tensor, flips: bool) -> torch.Tensor:
    if not flips:
        return _probabilities(model, x)
    total = 0
    for dims in ((), (-1,), (-2,), (-2, -1)):
        flipped = x.flip(dims) if dims else x
        p = _probabilities(model, flipped)
        total = total + (p.flip(dims) if dims else p)
    return total / 4


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, image: torch.Tensor, tile: int | None = None, overlap: int = 32,
                          tta: bool = False) -> torch.Tensor:
    """Per-class probabilities (K x H x W, or 1 x H x W for binary) for one C x H x W image, tiled when large."""
    from .model import output_shape

    device = next(model.parameters()).device
    image = image.to(device)
    channels, height, width = image.shape
    valid = getattr(model, "padding", "same") == "valid"
    if not valid:
        if tile is None or (height <= tile and width <= tile):
            return _tta(model, image[None], tta)[0].cpu()
        step = max(tile - overlap, 1)
        weight = _window(min(tile, height), min(tile, width)).to(device)
        out = None
        norm = torch.zeros(height, width, device=device)
        for top in _starts(height, tile, step):
            for left in _starts(width, tile, step):
                patch = image[:, top:top + tile, left:left + tile]
                probs = _tta(model, patch[None], tta)[0]
                if out is None:
                    out = torch.zeros(probs.shape[0], height, width, device=device)
                w = weight[:probs.shape[-2], :probs.shape[-1]]
                out[:, top:top + probs.shape[-2], left:left + probs.shape[-1]] += probs * w
                norm[top:top + probs.shape[-2], left:left + probs.shape[-1]] += w
        return (out / norm).cpu()
    # valid padding: the paper's overlap-tile strategy with mirrored borders
    tile = tile or 572
    out_size = output_shape(model, channels, tile, tile)[-1]
    margin = tile - out_size
    if margin % 2:
        raise UnetlabError(f"tile {tile} gives an output of {out_size}: the margin must be even; try tile {tile + 1}")
    margin //= 2
    padded = image
    for _ in range(4):  # reflection cannot pad more than the size - 1 at once
        need_y = max(0, margin - (padded.shape[-2] - height) // 2)
        need_x = max(0, margin - (padded.shape[-1] - width) // 2)
        if not need_y and not need_x:
            break
        py, px = min(need_y, padded.shape[-2] - 1), min(need_x, padded.shape[-1] - 1)
        padded = F.pad(padded[None], [px, px, py, py], mode="reflect")[0]
    oy, ox = (padded.shape[-2] - height) // 2 - margin, (padded.shape[-1] - width) // 2 - margin
    # grow to at least one tile (mirror again at the far side when the image is small)
    if padded.shape[-2] - oy < tile or padded.shape[-1] - ox < tile:
        extra_y = max(0, tile - (padded.shape[-2] - oy))
        extra_x = max(0, tile - (padded.shape[-1] - ox))
        padded = F.pad(padded[None], [0, extra_x, 0, extra_y], mode="replicate")[0]
    out = None
    for top in _starts(height, out_size, out_size):
        for left in _starts(width, out_size, out_size):
            patch = padded[:, oy + top:oy + top + tile, ox + left:ox + left + tile]
            probs = _tta(model, patch[None], tta)[0]
            if out is None:
                out = torch.zeros(probs.shape[0], height, width, device=device)
            h, w = min(out_size, height - top), min(out_size, width - left)
            out[:, top:top + h, left:left + w] = probs[:, :h, :w]
    return out.cpu()


def _read_image(path: Path, channels: int) -> torch.Tensor:
    from skimage import io

    try:
        array = io.imread(path).astype(np.float32)
    except Exception as exc:
        raise UnetlabError(f"cannot read image '{path}': {exception_text(exc)}") from None
    array = array / (65535.0 if array.max() > 255 else 255.0)
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[..., :3]
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[2] != channels:
        array = array.mean(axis=2, keepdims=True) if channels == 1 else np.repeat(array[..., :1], channels, axis=2)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


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


def predict_files(model_spec: str, inputs: list[str], out_dir: str, tile: int | None, overlap: int, tta: bool,
                  overlay: bool, tracking_uri: str | None = None) -> list[Path]:
    """Predict a mask for every input image and write it (and optionally an overlay) under ``out_dir``."""
    from skimage import io

    if tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
    files = _inputs(inputs)
    model = load_model(model_spec)
    if torch.cuda.is_available():
        model = model.cuda()
    channels = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    show = sys.stderr.isatty()
    iterator = files
    if show:
        from tqdm import tqdm

        iterator = tqdm(files, desc="predict", unit="image", file=sys.stderr)
    for path in iterator:
        image = _read_image(path, channels)
        probs = predict_probabilities(model, image, tile, overlap, tta)
        if probs.shape[0] == 1:
            mask = ((probs[0] > 0.5).numpy() * 255).astype(np.uint8)
        else:
            mask = probs.argmax(0).numpy().astype(np.uint8)
        target = out / f"{path.stem}_mask.png"
        io.imsave(target, mask, check_contrast=False)
        written.append(target)
        if overlay:
            rgb = image.numpy().transpose(1, 2, 0)
            rgb = np.repeat(rgb, 3, axis=2) if rgb.shape[2] == 1 else rgb
            classes = (mask > 127).astype(int) if probs.shape[0] == 1 else mask
            colours = np.array([[0, 0, 0], [1, 0.2, 0.2], [0.2, 1, 0.2], [0.2, 0.4, 1], [1, 1, 0.2], [1, 0.2, 1]])
            tinted = np.where(classes[..., None] > 0, 0.5 * rgb + 0.5 * colours[classes % len(colours)], rgb)
            io.imsave(out / f"{path.stem}_overlay.png", (np.clip(tinted, 0, 1) * 255).astype(np.uint8),
                      check_contrast=False)
    return written
