"""Decode image and mask files once into a cache of ``.npy`` arrays, read later with memory mapping.

An entry is keyed by the file's absolute path, size and modification time (and how it was decoded),
so a changed file gets a new entry: a stale decode is never served. Entries are written to a
temporary file and renamed, array first and its ``.json`` metadata last; an entry counts only when
its metadata exists, so a run killed mid-write leaves nothing that is read back.

The key decides only *where* an entry lives, never what it holds: nothing in an entry depends on the
file's path or modification time (the foreground positions are drawn with a seed taken from the mask's
content), so a dataset copied elsewhere trains on exactly the same patches.

Images decode to H x W x C in their own dtype (uint8, uint16, float) through one reader,
``read_image_file``, which ``unetlab data``, training and ``unetlab predict`` all use: every channel is
kept except an alpha the format declares as such; a multi-page file is refused in one line.
Normalisation happens later, per dataset. Masks decode to H x W raw values (palette PNGs: the palette
indices, not colours), and their metadata records which values occur, how often, and a few pixel
positions of each value (for foreground-centred patch sampling without reading the mask again).

"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UnetlabError, exception_text

__all__ = ["Entry", "cache_home", "content_seed", "decode_cached", "decode_many", "read_image_file",
           "read_mask_file", "remove_stale_temporaries_once", "resize_image", "to_grayscale"]

DECODER_VERSION = 3  # 2: foreground positions drawn with a content seed; 3: every channel kept
COORDS_PER_VALUE = 256  # pixel positions kept per mask value: enough to centre patches on foreground
OPEN_MAPS = 64  # memory maps kept open per process (opening one costs more than reading a patch from it)
_open_maps: dict[Path, np.ndarray] = {}  # insertion order = least recently used first


def cache_home() -> Path:
    """The cache root: ``$UNETLAB_CACHE_DIR`` or ``~/.cache/unetlab``."""
    return Path(os.environ.get("UNETLAB_CACHE_DIR") or Path.home() / ".cache" / "unetlab")


_swept: set[Path] = set()
_swept_lock = threading.Lock()


def remove_stale_temporaries_once(directory: Path, subfolders: bool = False) -> None:
    """Remove, once per process, the temporaries that killed writers left in ``directory`` (and in its
    immediate subfolders): a cache that is only read again would otherwise keep them for ever."""
    from .checkpoint import remove_stale_temporaries

    with _swept_lock:  # decode_cached runs in threads: one of them sweeps
        if directory in _swept:
            return
        _swept.add(directory)
    remove_stale_temporaries(directory)
    if subfolders and directory.is_dir():
        for sub in directory.iterdir():
            if sub.is_dir():
                remove_stale_temporaries(sub)


@dataclass(frozen=True)
class Entry:
    """One decoded file in the cache: its array file and metadata (shape, dtype; values for masks)."""

    source: Path
    array_path: Path
    meta: dict

    def load(self, mmap: bool = True) -> np.ndarray:
        """The decoded array, memory-mapped (read lazily, shared between processes) or read into RAM."""
        if not mmap:
            return np.load(self.array_path)
        array = _open_maps.pop(self.array_path, None)
        if array is None:
            array = np.load(self.array_path, mmap_mode="r")
            if len(_open_maps) >= OPEN_MAPS:
                _open_maps.pop(next(iter(_open_maps)))  # least recently used
        _open_maps[self.array_path] = array
        return array

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W)."""
        return tuple(self.meta["shape"][:2])

    @property
    def nbytes(self) -> int:
        """Size of the decoded array."""
        return int(np.prod(self.meta["shape"])) * np.dtype(self.meta["dtype"]).itemsize


# PIL modes whose last band the format declares as alpha (or padding, RGBX): the bands to keep
_PIL_ALPHA = {"LA": 1, "La": 1, "PA": 1, "RGBA": 3, "RGBa": 3, "RGBX": 3}
_TIFF_ALPHA = (1, 2)  # ExtraSamples: associated (premultiplied) and unassociated alpha; 0 = unspecified data


def _pil_array(path: Path, mask: bool) -> tuple[np.ndarray, bool]:
    from PIL import Image

    with Image.open(path) as img:
        frames = getattr(img, "n_frames", 1)
        if frames > 1:
            raise UnetlabError(f"'{path}' holds {frames} frames: unetlab reads one image per file; save each frame "
                               "as its own file")
        palette = img.mode in ("P", "PA")
        if palette and not mask:
            img = img.convert("RGBA" if "transparency" in img.info or img.mode == "PA" else "RGB")
        elif img.mode == "1":
            img = img.convert("L")
        keep = _PIL_ALPHA.get(img.mode)
        array = np.asarray(img)
    if keep is not None:  # a declared alpha: not data
        array = array[..., :keep]
    if array.dtype == np.int32 and array.size and array.min() >= 0 and array.max() <= 65535:
        array = array.astype(np.uint16)  # 16-bit PNGs opened as 32-bit integer images
    return array, palette


def _tiff_array(path: Path) -> np.ndarray:
    """H x W (x C) from a TIFF. Channels are the page's samples (contiguous or planar) or an ImageJ / OME
    channel axis; only samples that ExtraSamples declares as alpha are dropped. Any other page axis
    (a stack, a time series, several images) is refused: which page would be meant is not known."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        pages, series = len(tif.pages), tif.series
        if not series:
            raise UnetlabError(f"'{path}' holds no image")
        axes, shape, keyframe = series[0].axes, series[0].shape, series[0].keyframe
        kept = [(a, n) for a, n in zip(axes, shape) if n > 1 or a in "YX"]
        layout = "".join(a for a, _ in kept)
        if len(series) > 1 or set(layout) - set("YXSC") or ("S" in layout and "C" in layout) or \
                not {"Y", "X"} <= set(layout):
            raise UnetlabError(
                f"'{path}' is a multi-page TIFF ({pages} pages) of shape {'x'.join(map(str, shape))} ({axes}): "
                "unetlab reads one image per file; save each page as its own file, or channels as samples of one page "
                "(tifffile.imwrite(path, image_hwc, photometric='minisblack', planarconfig='contig'))")
        samples, extras = int(keyframe.samplesperpixel), tuple(int(e) for e in keyframe.extrasamples)
        array = series[0].asarray().reshape([n for _, n in kept])
    for channel_axis in "SC":
        if channel_axis in layout:
            array = np.moveaxis(array, layout.index(channel_axis), -1)
    if "S" in layout and extras:
        alpha = {samples - len(extras) + i for i, e in enumerate(extras) if e in _TIFF_ALPHA}
        if alpha:
            array = array[..., [c for c in range(array.shape[-1]) if c not in alpha]]
    return array


def _read(path: Path, mask: bool) -> tuple[np.ndarray, bool]:
    """The file's pixels (H x W or H x W x C, alpha dropped) and whether it is a palette image."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            return _tiff_array(path), False
        return _pil_array(path, mask)
    except UnetlabError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken file makes decoders raise anything
        raise UnetlabError(f"cannot read '{path}': {exception_text(exc)}") from None


def read_image_file(path: Path) -> np.ndarray:
    """An image as H x W x C in its own dtype: the one reader of ``unetlab data``, training and ``predict``.

    Every channel is kept (2- and 4-channel images too) except an alpha that the format declares (PIL
    modes LA, RGBA, PA..., TIFF ExtraSamples = alpha); a multi-page TIFF or multi-frame file is refused.
    Raises ``UnetlabError`` naming the file.
    """
    array = _read(path, mask=False)[0]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise UnetlabError(f"'{path}' has shape {array.shape}: expected a 2-D image (H x W or H x W x C)")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    return np.ascontiguousarray(array)


def read_mask_file(path: Path) -> tuple[np.ndarray, bool]:
    """A mask as H x W raw values and whether it is a palette image; raises ``UnetlabError`` naming the file."""
    array, palette = _read(path, mask=True)
    if array.ndim == 3:
        if not (array == array[..., :1]).all():
            raise UnetlabError(f"mask '{path}' is a colour image with differing channels: save masks as class "
                               "indices (one channel) or as a palette PNG")
        array = array[..., 0]
    if array.ndim != 2:
        raise UnetlabError(f"mask '{path}' has shape {array.shape}: expected H x W")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype.kind not in "ui" or array.size and (array.min() < 0 or array.max() > 65535):
        raise UnetlabError(f"mask '{path}' holds {array.dtype} values: expected integers 0..65535 (class indices, "
                           "{0, 255} or palette indices)")
    return np.ascontiguousarray(array.astype(np.uint8 if array.max(initial=0) <= 255 else np.uint16)), palette


def to_grayscale(array: np.ndarray) -> np.ndarray:
    """H x W x C -> H x W x 1, the channel mean in the image's own dtype (integers rounded)."""
    mean = array.mean(axis=2, keepdims=True)
    return (np.rint(mean) if array.dtype.kind in "ui" else mean).astype(array.dtype)


def resize_image(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An H x W x C image resized to ``size`` (bilinear, anti-aliased, in its own dtype), as training resizes."""
    return _resize(array, size, nearest=False)


def _resize(array: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    from skimage.transform import resize

    if array.shape[:2] == tuple(size):
        return array
    shape = tuple(size) + array.shape[2:]
    if nearest:
        out = resize(array, shape, order=0, preserve_range=True, anti_aliasing=False)
        return out.astype(array.dtype)
    out = resize(array, shape, order=1, preserve_range=True, anti_aliasing=True)
    if array.dtype.kind in "ui":
        out = np.clip(np.rint(out), np.iinfo(array.dtype).min, np.iinfo(array.dtype).max)
    return out.astype(array.dtype)


def content_seed(array: np.ndarray) -> int:
    """A seed taken from an array's content (shape, dtype, bytes) only: the same pixels give the same seed
    wherever the file lies and whenever it was written."""
    digest = hashlib.sha256(f"{array.shape}{array.dtype.str}".encode())
    digest.update(np.ascontiguousarray(array).data)
    return int.from_bytes(digest.digest()[:8], "little")


def _mask_meta(mask: np.ndarray) -> dict:
    counts = np.bincount(mask.ravel(), minlength=1)
    values = np.flatnonzero(counts)
    rng = np.random.default_rng(content_seed(mask))  # never the cache key: that holds the path and mtime
    coords: dict[str, list] = {}
    for v in values.tolist():
        ys, xs = np.nonzero(mask == v)
        pick = np.sort(rng.choice(len(ys), size=min(COORDS_PER_VALUE, len(ys)), replace=False))
        coords[str(v)] = np.stack([ys[pick], xs[pick]], 1).tolist()
    return {"values": values.tolist(), "counts": counts[values].tolist(), "coords": coords}


def _key(path: Path, kind: str, options: dict) -> str:
    stat = path.stat()
    ident = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "kind": kind,
             "options": options, "version": DECODER_VERSION}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def decode_cached(path: Path, kind: str, grayscale: bool = False, resize: tuple[int, int] | None = None,
                  root: Path | None = None) -> Entry:
    """The cache entry of ``path`` decoded as ``kind`` (``image`` or ``mask``), decoding it if needed."""
    options: dict[str, Any] = {"grayscale": grayscale and kind == "image", "resize": list(resize) if resize else None}
    try:
        key = _key(path, kind, options)
    except OSError as exc:
        raise UnetlabError(f"cannot read '{path}': {exception_text(exc)}") from None
    remove_stale_temporaries_once(root or cache_home() / "decoded", subfolders=True)
    folder = (root or cache_home() / "decoded") / key[:2]
    array_path, meta_path = folder / f"{key}.npy", folder / f"{key}.json"
    if meta_path.exists() and array_path.exists():
        try:
            return Entry(path, array_path, _compact(json.loads(meta_path.read_text())))
        except (OSError, ValueError):
            pass  # unreadable metadata: decode again
    if kind == "image":
        array = read_image_file(path)
        source_shape = list(array.shape[:2])
        if grayscale and array.shape[2] > 1:
            array = to_grayscale(array)
        if resize:
            array = resize_image(array, resize)
        meta: dict[str, Any] = {}
    else:
        array, palette = read_mask_file(path)
        source_shape = list(array.shape[:2])
        if resize:
            array = _resize(array, resize, nearest=True)
        meta = {"palette": palette, **_mask_meta(array)}
    meta = {"shape": list(array.shape), "source_shape": source_shape, "dtype": array.dtype.name, **meta}
    folder.mkdir(parents=True, exist_ok=True)
    suffix = f".{os.getpid()}.{threading.get_ident()}.tmp"
    tmp_array, tmp_meta = folder / f"{key}{suffix}.npy", folder / f"{key}{suffix}.json"
    with open(tmp_array, "wb") as f:
        np.save(f, array)
    tmp_meta.write_text(json.dumps(meta))
    os.replace(tmp_array, array_path)
    os.replace(tmp_meta, meta_path)  # last: the entry exists only once its array is complete
    return Entry(path, array_path, _compact(meta))


def _compact(meta: dict) -> dict:
    """Pixel positions as small int32 arrays: as JSON lists they cost ~50 KB of RAM per mask."""
    if "coords" in meta:
        meta["coords"] = {v: np.asarray(c, np.int32).reshape(-1, 2) for v, c in meta["coords"].items()}
    return meta


def decode_many(jobs: list[tuple[Path, str]], grayscale: bool = False, resize: tuple[int, int] | None = None,
                workers: int | None = None) -> tuple[list[Entry | None], list[str]]:
    """Decode ``(path, kind)`` jobs in threads (decoders release the GIL); return entries and problems.

    A file that cannot be decoded gives ``None`` and one problem line naming it; the others go on, so
    that every problem of a dataset is found in one pass.
    """
    def one(job: tuple[Path, str]) -> tuple[Entry | None, str | None]:
        try:
            return decode_cached(job[0], job[1], grayscale, resize), None
        except UnetlabError as exc:
            return None, str(exc)

    workers = workers or min(8, os.cpu_count() or 1)
    if len(jobs) < 4 or workers == 1:
        results = [one(j) for j in jobs]
    else:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, jobs))
    return [r[0] for r in results], [r[1] for r in results if r[1]]
