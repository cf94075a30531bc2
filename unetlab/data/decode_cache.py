"""Decode image and mask files once into a cache of ``.npy`` arrays, read later with memory mapping.

An entry is keyed by the file's absolute path, size and modification time (and how it was decoded),
so a changed file gets a new entry: a stale decode is never served. Entries are written to a
temporary file and renamed, array first and its ``.json`` metadata last; an entry counts only when
its metadata exists, so a run killed mid-write leaves nothing that is read back. What is read back is
checked before use (``_check_entry``: the metadata's schema, the array file's header, size and a
fingerprint of sampled blocks); a damaged entry is decoded again with one warning line. A cache
folder that cannot be written is one ``UnetlabError`` line naming it and ``UNETLAB_CACHE_DIR``.

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

import contextlib
import hashlib
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from unetlab.errors import UnetlabError, exception_text

__all__ = ["CacheUnusable", "Entry", "cache_home", "content_seed", "decode_cached", "decode_many", "fingerprint",
           "read_image_file", "read_mask_file", "remove_stale_temporaries_once", "resize_image", "to_grayscale"]

DECODER_VERSION = 5  # 2: content seeds; 3: every channel kept; 4: checked entries; 5: native byte order
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
    from unetlab.checkpoint import remove_stale_temporaries

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

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of the decoded array, read with one positioned read: for a patch, opening
        a memory map (``np.load`` parses the header each time) and faulting its pages in cost several
        times more than reading the rows (issue 19 item 6)."""
        shape, dtype = self.meta["shape"], np.dtype(self.meta["dtype"])
        row = int(np.prod(shape[1:])) * dtype.itemsize
        out = np.empty((stop - start, *shape[1:]), dtype)
        with open(self.array_path, "rb", buffering=0) as f:
            # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12; arrays support the buffer protocol
            read = os.preadv(f.fileno(), [out],  # type: ignore[list-item]
                             self.meta["size"] - shape[0] * row + start * row)  # data: the tail
        if read != out.nbytes:
            raise UnetlabError(f"decode cache entry '{self.array_path}' changed while in use: run again")
        return out

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


class CacheUnusable(UnetlabError):
    """The decode cache folder cannot be written (read-only, full, not a folder)."""


def _unusable(root: Path, exc: OSError) -> CacheUnusable:
    return CacheUnusable(f"decode cache folder '{root}' cannot be written ({exception_text(exc)}): free space "
                         "there or set UNETLAB_CACHE_DIR to a writable folder")


FINGERPRINT_BLOCK = 4096
FINGERPRINT_BLOCKS = 16  # besides the first and the last: evenly spaced through the file


def fingerprint(path: Path) -> str:
    """A cheap checksum of a cache array file: its size and a hash of its first and last 64 KiB and of
    16 evenly spaced 4 KiB blocks (a few reads per file whatever its size; a full hash of every
    decoded set at each run start would cost seconds)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        digest.update(size.to_bytes(8, "little"))
        head, tail = 16 * FINGERPRINT_BLOCK, 16 * FINGERPRINT_BLOCK
        offsets = [(0, head), (max(size - tail, 0), tail)]
        offsets += [(size * (k + 1) // (FINGERPRINT_BLOCKS + 1), FINGERPRINT_BLOCK) for k in range(FINGERPRINT_BLOCKS)]
        for offset, length in offsets:
            digest.update(os.pread(f.fileno(), length, offset))
    return digest.hexdigest()


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from a ``.npy`` file's header."""
    from numpy.lib import format as npy

    with open(path, "rb") as f:
        version = npy.read_magic(f)
        read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran:
            raise ValueError("Fortran-ordered array")
        return tuple(shape), dtype, f.tell()


def _ints(value: Any, length: int | None = None, low: int = 0) -> TypeGuard[list[Any]]:
    return isinstance(value, list) and (length is None or len(value) == length) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value)


def _check_meta(meta: Any, kind: str) -> str | None:
    """Why the metadata of a ``kind`` entry is unusable, or None: every field the readers use, typed."""
    if not isinstance(meta, dict):
        return f"metadata is {type(meta).__name__}, not an object"
    if meta.get("version") != DECODER_VERSION or meta.get("kind") != kind:
        return f"metadata of decoder {meta.get('version')!r} / kind {meta.get('kind')!r}"
    shape = meta.get("shape")
    if not _ints(shape, 3 if kind == "image" else 2, 1) or not _ints(meta.get("source_shape"), 2, 1):
        return f"bad shape {shape!r} / source_shape {meta.get('source_shape')!r}"
    if meta.get("dtype") not in ("uint8", "uint16", "uint32", "int8", "int16", "int32", "float16", "float32",
                                 "float64") or (kind == "mask" and meta["dtype"] not in ("uint8", "uint16")):
        return f"bad dtype {meta.get('dtype')!r}"
    if not isinstance(meta.get("size"), int) or not isinstance(meta.get("fingerprint"), str):
        return "no size or fingerprint"
    if kind == "mask":
        values, counts, coords = meta.get("values"), meta.get("counts"), meta.get("coords")
        if not isinstance(meta.get("palette"), bool) or not _ints(values) or not values or \
                values != sorted(set(values)) or not _ints(counts, len(values), 1) or \
                sum(counts) != shape[0] * shape[1] or not isinstance(coords, dict) or \
                set(coords) != {str(v) for v in values}:
            return "bad mask values, counts or positions"
        for v, count in zip(values, counts):
            points = coords[str(v)]
            if not isinstance(points, list) or len(points) != min(COORDS_PER_VALUE, count) or not all(
                    _ints(p, 2) and p[0] < shape[0] and p[1] < shape[1] for p in points):
                return f"bad positions of mask value {v}"
    return None


def _check_entry(array_path: Path, meta_path: Path, kind: str) -> tuple[dict | None, str]:
    """The entry's metadata when the entry is sound, else (None, why not)."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        return None, f"unreadable metadata ({exception_text(exc)})"
    problem = _check_meta(meta, kind)
    if problem:
        return None, problem
    try:
        shape, dtype, offset = _npy_header(array_path)
        size = array_path.stat().st_size
        if list(shape) != meta["shape"] or dtype.name != meta["dtype"] or dtype.hasobject:
            return None, f"array is {dtype.name} {shape}, metadata says {meta['dtype']} {tuple(meta['shape'])}"
        if size != meta["size"] or size != offset + int(np.prod(shape)) * dtype.itemsize:
            return None, f"array file has {size} bytes, expected {meta['size']}"
        if not dtype.isnative:
            return None, f"array stored as {dtype.str}, not in this machine's byte order"
        if fingerprint(array_path) != meta["fingerprint"]:
            return None, "array content differs from when it was written (fingerprint)"
    except (OSError, ValueError) as exc:
        return None, f"unreadable array ({exception_text(exc)})"
    return meta, ""


def _write_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` that fails on a short write: ``np.save`` writes the data with ``ndarray.tofile``, which
    leaves a truncated file without an error when the disk fills up."""
    from numpy.lib import format as npy

    array = np.ascontiguousarray(array)
    with open(path, "wb") as f:
        npy.write_array_header_1_0(f, npy.header_data_from_array_1_0(array))
        f.write(array.data)
        expected = f.tell()
    if path.stat().st_size != expected:
        raise OSError(f"wrote {path.stat().st_size} of {expected} bytes of '{path}'")


def decode_cached(path: Path, kind: str, grayscale: bool = False, resize: tuple[int, int] | None = None,
                  root: Path | None = None) -> Entry:
    """The cache entry of ``path`` decoded as ``kind`` (``image`` or ``mask``), decoding it if needed.

    An existing entry is checked first (``_check_entry``); a damaged one is decoded again with one warning
    line. Raises ``UnetlabError`` for an unreadable file, ``CacheUnusable`` when the cache cannot be written.
    """
    options: dict[str, Any] = {"grayscale": grayscale and kind == "image", "resize": list(resize) if resize else None}
    try:
        key = _key(path, kind, options)
    except OSError as exc:
        raise UnetlabError(f"cannot read '{path}': {exception_text(exc)}") from None
    home = root or cache_home() / "decoded"
    remove_stale_temporaries_once(home, subfolders=True)
    folder = home / key[:2]
    array_path, meta_path = folder / f"{key}.npy", folder / f"{key}.json"
    if meta_path.exists():
        cached, problem = _check_entry(array_path, meta_path, kind)
        if cached is not None:
            return Entry(path, array_path, _compact(cached))
        sys.stderr.write(f"unetlab: warning: decode cache entry '{meta_path.with_suffix('')}' of '{path}' is "
                         f"damaged ({problem}): decoding the file again\n")  # one write: decoded in threads
        _open_maps.pop(array_path, None)  # a map of the damaged file must not be served
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
    array = array.astype(array.dtype.newbyteorder("="), copy=False)  # big-endian TIFFs: read_rows reads native
    meta = {"version": DECODER_VERSION, "kind": kind, "shape": list(array.shape), "source_shape": source_shape,
            "dtype": array.dtype.name, **meta}
    suffix = f".{os.getpid()}.{threading.get_ident()}.tmp"
    tmp_array, tmp_meta = folder / f"{key}{suffix}.npy", folder / f"{key}{suffix}.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_npy(tmp_array, array)
        meta.update(size=tmp_array.stat().st_size, fingerprint=fingerprint(tmp_array))
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_array, array_path)
        os.replace(tmp_meta, meta_path)  # last: the entry exists only once its array is complete
    except OSError as exc:
        for tmp in (tmp_array, tmp_meta):  # nothing half-written stays behind
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise _unusable(home, exc) from None
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
    that every problem of a dataset is found in one pass. An unusable cache folder raises ``CacheUnusable``.
    """
    def one(job: tuple[Path, str]) -> tuple[Entry | None, str | None]:
        try:
            return decode_cached(job[0], job[1], grayscale, resize), None
        except CacheUnusable:
            raise  # the cache as a whole, not this file: one line, not one problem per file
        except UnetlabError as exc:
            return None, str(exc)

    workers = workers or min(8, os.cpu_count() or 1)
    if len(jobs) < 4 or workers == 1:
        results = [one(j) for j in jobs]
    else:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, jobs))
    return [r[0] for r in results], [r[1] for r in results if r[1]]
