"""Decode image and mask files once into a cache of ``.npy`` arrays, read later with memory mapping.

An entry is keyed by the file's absolute path, size and modification time (and how it was decoded),
so a changed file gets a new entry: a stale decode is never served. Entries are written to a
temporary file and renamed, array first and its ``.json`` metadata last; an entry counts only when
its metadata exists, so a run killed mid-write leaves nothing that is read back.

The key decides only *where* an entry lives, never what it holds: nothing in an entry depends on the
file's path or modification time (the foreground positions are drawn with a seed taken from the mask's
content), so a dataset copied elsewhere trains on exactly the same patches.

Images decode to H x W x C in their own dtype (uint8, uint16, float): normalisation happens later,
per dataset. Masks decode to H x W raw values (palette PNGs: the palette indices, not colours), and
their metadata records which values occur, how often, and a few pixel positions of each value (for
foreground-centred patch sampling without reading the mask again).
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

DECODER_VERSION = 2  # 2: foreground positions drawn with a content seed
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


def _pil_array(path: Path, mask: bool) -> tuple[np.ndarray, bool]:
    from PIL import Image

    with Image.open(path) as img:
        palette = img.mode == "P"
        if palette and not mask:
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif img.mode == "1":
            img = img.convert("L")
        array = np.asarray(img)
    if array.dtype == np.int32 and array.size and array.min() >= 0 and array.max() <= 65535:
        array = array.astype(np.uint16)  # 16-bit PNGs opened as 32-bit integer images
    return array, palette


def _tiff_array(path: Path) -> np.ndarray:
    import tifffile

    array = tifffile.imread(path)
    array = np.squeeze(array)
    if array.ndim == 3 and array.shape[0] <= 4 < array.shape[2]:  # planar (C, H, W) -> (H, W, C)
        array = np.moveaxis(array, 0, -1)
    return array


def read_image_file(path: Path) -> np.ndarray:
    """An image as H x W x C in its own dtype (alpha dropped); raises ``UnetlabError`` naming the file."""
    try:
        array = _tiff_array(path) if path.suffix.lower() in (".tif", ".tiff") else _pil_array(path, mask=False)[0]
    except Exception as exc:  # noqa: BLE001 - a broken file makes decoders raise anything
        raise UnetlabError(f"cannot read '{path}': {exception_text(exc)}") from None
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise UnetlabError(f"'{path}' has shape {array.shape}: expected a 2-D image (H x W or H x W x C)")
    if array.shape[2] in (2, 4):  # grey + alpha, RGB + alpha
        array = array[..., : array.shape[2] - 1]
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    return np.ascontiguousarray(array)


def read_mask_file(path: Path) -> tuple[np.ndarray, bool]:
    """A mask as H x W raw values and whether it is a palette image; raises ``UnetlabError`` naming the file."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            array, palette = _tiff_array(path), False
        else:
            array, palette = _pil_array(path, mask=True)
    except Exception as exc:  # noqa: BLE001 - a broken file makes decoders raise anything
        raise UnetlabError(f"cannot read '{path}': {exception_text(exc)}") from None
    if array.ndim == 3:
        if array.shape[2] in (2, 4):
            array = array[..., : array.shape[2] - 1]
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
