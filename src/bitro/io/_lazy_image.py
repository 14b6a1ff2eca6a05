"""Lazy access to flat (non-tiled) RGB images such as the JPEGs of legacy ST sections.

A JPEG has no random access: any pixel needs the whole file decoded. :func:`lazy_rgb_pyramid`
opens the file for its header only (size, mode) and returns dask arrays, one per pyramid level,
whose chunks all slice a cached decode. The first full-resolution chunk that is computed decodes
the file once (under a lock, so concurrent chunks wait for it instead of decoding again); every
later chunk reuses that decode. Coarse levels of a JPEG come from libjpeg's reduced decodes (DCT
scaling at 1/4, 1/8: a fraction of the cost of a full decode, and no full decode needed to
show the whole slide), then block averages; other formats average blocks of the full decode.
Decodes are kept per process up to :data:`DECODED_CACHE_BYTES` (least recently used out first), so
reading section after section stays bounded in memory.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import dask.array as da

#: Bytes of decoded images kept in memory per process (the most recent decode is always kept). Room
#: for one full decode of a 92-Mpx legacy ST section (276 MB) and its reduced decodes: bitro reads
#: sections one after the other, so a second full decode kept would only hold memory.
DECODED_CACHE_BYTES = 384 * 2**20
#: Reduced decodes that libjpeg makes by DCT scaling (1/2 is left out: it costs about as much as a full decode).
JPEG_REDUCTIONS = (8, 4)

_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
_cache_lock = threading.Lock()
_decode_locks: dict[tuple, threading.Lock] = {}
_pil_limit_lock = threading.RLock()


@contextmanager
def allow_large_images() -> Iterator[None]:
    """Lift PIL's decompression-bomb limit for the duration of the block only.

    Whole-slide H&E images (~92 Mpx for a legacy ST section) exceed PIL's default limit; the
    user's own limit is restored on exit.
    """
    from PIL import Image

    with _pil_limit_lock:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def image_header(path: Path) -> tuple[int, int, str]:
    """``(height, width, mode)`` of an image file, reading its header only.

    Raises a :class:`ValueError` naming the file when it is not an image PIL can read, or when it
    is a JPEG without its end-of-image marker (a truncated download).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with allow_large_images(), Image.open(path) as im:
            width, height = im.size
            mode, fmt = im.mode, im.format
    except (UnidentifiedImageError, OSError) as e:
        msg = f"Cannot read the image {str(path)!r}: {e}. Is it a valid JPEG/PNG/TIFF file?"
        raise ValueError(msg) from e
    if fmt == "JPEG" and not _has_jpeg_end(path):
        msg = f"The JPEG {str(path)!r} is truncated (no end-of-image marker); download or copy it again."
        raise ValueError(msg)
    return height, width, mode


def _has_jpeg_end(path: Path, tail: int = 65536) -> bool:
    """Whether the last ``tail`` bytes of a JPEG hold its end-of-image marker (FF D9)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - tail))
        return b"\xff\xd9" in f.read()


def _file_key(path: Path) -> tuple:
    stat = os.stat(path)
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _decode(path: Path, reduce: int = 1) -> np.ndarray:
    """Decode the file into a ``(y, x, 3)`` uint8 array (RGB; an alpha channel is dropped).

    ``reduce`` (2, 4 or 8; JPEG only) asks libjpeg for a decode at that fraction of the size.
    Full JPEG decodes use libjpeg-turbo through :mod:`imagecodecs`, straight into the array: ~4x faster
    than PIL here and without PIL's 4-bytes-per-pixel intermediate copy. Other formats go through PIL.
    """
    import imagecodecs
    from PIL import Image

    try:
        data = path.read_bytes()
        if reduce == 1 and _is_jpeg(data):
            arr = imagecodecs.jpeg8_decode(data)
        else:
            with allow_large_images(), Image.open(path) as im:
                if reduce > 1:  # libjpeg's DCT scaling: size ceil(width / reduce) x ceil(height / reduce)
                    im.draft("RGB", (im.width // reduce, im.height // reduce))
                arr = np.asarray(im)
    except (OSError, RuntimeError, ValueError) as e:
        msg = f"Cannot decode the image {str(path)!r}: {e}. The file may be truncated or corrupt."
        raise OSError(msg) from e
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        msg = f"The image {str(path)!r} decoded to shape {arr.shape}; expected RGB(A) pixels (y, x, 3 or 4)."
        raise ValueError(msg)
    return arr[..., :3]


def _is_jpeg(head: bytes) -> bool:
    return head[:2] == b"\xff\xd8"  # JPEG start-of-image marker


def decoded(path: Path, reduce: int = 1) -> np.ndarray:
    """The decoded pixels of ``path`` (``(y, x, 3)`` uint8), decoded at most once while cached.

    ``reduce`` > 1: a JPEG's reduced decode at ``1/reduce`` of the size (see :func:`_decode`).
    """
    key = (*_file_key(path), reduce)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        lock = _decode_locks.setdefault(key, threading.Lock())
    with lock:  # one decode per file and size; other threads wait for it
        with _cache_lock:
            if key in _cache:
                return _cache[key]
            _make_room(_decoded_bytes(path, reduce))
        arr = _decode(path, reduce)
        with _cache_lock:
            _cache[key] = arr
            while len(_cache) > 1 and sum(a.nbytes for a in _cache.values()) > DECODED_CACHE_BYTES:
                _cache.popitem(last=False)
    return arr


def _decoded_bytes(path: Path, reduce: int) -> int:
    """Bytes of the decode of ``path`` at ``1/reduce`` of its size, from its header."""
    height, width, _ = image_header(path)
    return -(-height // reduce) * -(-width // reduce) * 3


def _make_room(nbytes: int) -> None:
    """Forget the oldest decodes until one of ``nbytes`` fits (caller holds ``_cache_lock``).

    Done before decoding, so that the next section's decode does not sit beside the previous
    section's until the cache is trimmed (two 276-MB decodes at once for HER2ST).
    """
    while _cache and sum(a.nbytes for a in _cache.values()) + nbytes > DECODED_CACHE_BYTES:
        _cache.popitem(last=False)


def clear_cache() -> None:
    """Forget every decoded image of this process."""
    with _cache_lock:
        _cache.clear()


class _LazyRGB:
    """Array-like ``(c, y, x)`` view of an image file at ``1/factor`` of its size (``factor`` a power of 2).

    Slicing decodes the file (once, cached). A level with ``factor > 1`` averages blocks of a JPEG's
    reduced decode (``1/reduce``, at most 1/8) or, for other formats, of the full decode.
    """

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, path: Path, height: int, width: int, factor: int, *, jpeg: bool) -> None:
        self.path, self.factor = path, factor
        self.reduce = next((r for r in JPEG_REDUCTIONS if factor % r == 0), 1) if jpeg else 1
        self.shape = (3, height // factor, width // factor)

    def __getitem__(self, index: tuple[slice, slice, slice]) -> np.ndarray:
        c, y, x = (slice(*s.indices(n)[:2]) for s, n in zip(index, self.shape, strict=True))
        source, f = decoded(self.path, self.reduce), self.factor // self.reduce
        if f == 1:
            return np.ascontiguousarray(source[y, x, c].transpose(2, 0, 1))
        ny, nx = y.stop - y.start, x.stop - x.start
        block = source[y.start * f : y.stop * f, x.start * f : x.stop * f, c].reshape(ny, f, nx, f, -1)
        total = np.zeros((ny, nx, block.shape[-1]), dtype=np.uint32)
        for i in range(f):  # ~10x faster than block.mean(axis=(1, 3)), which reduces over strided axes
            for j in range(f):
                total += block[:, i, :, j]
        return ((total + f * f // 2) // (f * f)).astype(np.uint8).transpose(2, 0, 1).copy()

    def __dask_tokenize__(self) -> tuple:
        return ("bitro-lazy-rgb", *_file_key(self.path), self.factor, self.reduce)


def lazy_rgb_pyramid(path: Path, *, n_levels: int | None = None, chunk: int) -> list[da.Array]:
    """Pyramid levels (``(c, y, x)`` uint8 dask arrays) of an RGB(A) image file; opening reads the header only.

    Level ``k`` is the image reduced ``2**k`` times; all chunks of a level slice one cached decode
    (the full decode for level 0, a reduced JPEG decode for coarse levels), so no chunk decodes the
    file again and no level is a chain of resampling steps.

    Parameters
    ----------
    path
        The image file (any format PIL reads; JPEG for legacy ST sections).
    n_levels
        Number of levels; by default until the long edge is below 1024 px
        (:func:`bitro.io._build.pyramid_factors`).
    chunk
        Chunk edge in pixels.

    Returns
    -------
    Dask arrays with chunks ``(3, chunk, chunk)``, largest first. Grayscale and other non-RGB images
    raise a :class:`ValueError`; an alpha channel is dropped with a warning.
    """
    import dask.array as da

    from bitro._logging import logger
    from bitro.io._build import pyramid_factors

    height, width, mode = image_header(path)
    if mode not in ("RGB", "RGBA"):
        msg = (
            f"The image {str(path)!r} has PIL mode {mode!r}; bitro needs an RGB H&E image. "
            "Convert it to RGB first (e.g. `PIL.Image.open(path).convert('RGB').save(...)`)."
        )
        raise ValueError(msg)
    if mode == "RGBA":
        logger.warning("The image %r has an alpha channel; it is dropped (only RGB is used).", str(path))
    if n_levels is None:
        n_levels = len(pyramid_factors(height, width)) + 1
    with open(path, "rb") as f:
        jpeg = _is_jpeg(f.read(2))
    meta = np.empty((0, 0, 0), dtype=np.uint8)
    return [
        da.from_array(
            _LazyRGB(path, height, width, 2**k, jpeg=jpeg),
            chunks=(3, chunk, chunk),
            asarray=False,
            meta=meta,
            fancy=False,
        )
        for k in range(n_levels)
    ]
