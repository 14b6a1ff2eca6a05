"""Per-cell morphology: shape statistics of the nucleus polygons and stain intensities of the crops.

The columns are the names of :attr:`bitro.Key.MORPHOLOGY`; each value is tied to its column by name (never by
position), so reordering ``Key.MORPHOLOGY`` reorders the features of new cell tables but cannot mislabel one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bitro._constants import Key
from bitro.pp._encoders import hed

#: The shape columns :func:`morphology` returns (lengths in um, areas in um^2).
SHAPE_COLUMNS: tuple[str, ...] = Key.MORPHOLOGY_SHAPE
#: The stain columns, in the order of the columns :func:`nucleus_stains` returns.
STAIN_COLUMNS: tuple[str, ...] = Key.MORPHOLOGY_STAIN


def morphology(polygons: np.ndarray, pixel_size: float) -> pd.DataFrame:
    """Shape statistics of nucleus polygons (pixels), in micrometres.

    Area, perimeter, convex-hull solidity and circularity from shapely; major/minor axis and
    eccentricity from the polygon's exact second moments (Green's theorem; for a MultiPolygon its
    largest part), with the conventions of :func:`skimage.measure.regionprops`.

    Parameters
    ----------
    polygons
        Shapely polygons in pixels.
    pixel_size
        Micrometres per pixel.

    Returns
    -------
    One row per polygon; the columns :data:`SHAPE_COLUMNS` (named as in :attr:`bitro.Key.MORPHOLOGY`).
    """
    # in blocks of cells: the vertex arrays of a whole slide's polygons (tens of millions of vertices,
    # a dozen temporaries) would make the peak memory grow with the slide; every value is per cell,
    # so the blocks give the same numbers
    polygons = np.asarray(polygons)
    if len(polygons) <= MORPHOLOGY_BLOCK:
        return _morphology_block(polygons, pixel_size)
    blocks = [
        _morphology_block(polygons[i : i + MORPHOLOGY_BLOCK], pixel_size)
        for i in range(0, len(polygons), MORPHOLOGY_BLOCK)
    ]
    return pd.concat(blocks, ignore_index=True)


#: Cells whose polygons :func:`morphology` measures at once.
MORPHOLOGY_BLOCK = 32768


def _morphology_block(polygons: np.ndarray, pixel_size: float) -> pd.DataFrame:
    import shapely

    area = shapely.area(polygons)
    perimeter = shapely.length(polygons)
    hull = shapely.area(shapely.convex_hull(polygons))
    parts, owner = shapely.get_parts(polygons, return_index=True)
    order = np.lexsort((-shapely.area(parts), owner))  # largest part of each cell first
    first = order[np.r_[True, owner[order][1:] != owner[order][:-1]]]
    main = parts[first]
    centre = shapely.get_coordinates(shapely.centroid(main))
    coords, idx = shapely.get_coordinates(shapely.get_exterior_ring(main), return_index=True)
    coords = coords - centre[idx]
    same = idx[:-1] == idx[1:]
    x0, y0, x1, y1, ring = coords[:-1, 0], coords[:-1, 1], coords[1:, 0], coords[1:, 1], idx[:-1]
    x0, y0, x1, y1, ring = x0[same], y0[same], x1[same], y1[same], ring[same]
    cross = x0 * y1 - x1 * y0
    n = len(main)
    a = np.bincount(ring, cross, minlength=n) / 2
    sxx = np.bincount(ring, (x0**2 + x0 * x1 + x1**2) * cross, minlength=n) / 12
    syy = np.bincount(ring, (y0**2 + y0 * y1 + y1**2) * cross, minlength=n) / 12
    sxy = np.bincount(ring, (x0 * y1 + 2 * x0 * y0 + 2 * x1 * y1 + x1 * y0) * cross, minlength=n) / 24
    with np.errstate(divide="ignore", invalid="ignore"):
        mxx, myy, mxy = sxx / a, syy / a, sxy / a
        half, root = (mxx + myy) / 2, np.sqrt(((mxx - myy) / 2) ** 2 + mxy**2)
        l1, l2 = np.maximum(half + root, 0), np.maximum(half - root, 0)
        ecc = np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / l1, 0, 1)), 0.0)
        solidity = np.where(hull > 0, area / hull, 0.0)
        circularity = np.where(perimeter > 0, 4 * np.pi * area / perimeter**2, 0.0)
    values = {
        Key.AREA_UM2: area * pixel_size**2,
        "perimeter_um": perimeter * pixel_size,
        "major_axis_um": 4 * np.sqrt(l1) * pixel_size,
        "minor_axis_um": 4 * np.sqrt(l2) * pixel_size,
        "eccentricity": ecc,
        "solidity": solidity,
        "circularity": circularity,
    }
    return pd.DataFrame({name: values[name] for name in SHAPE_COLUMNS})


def nucleus_stains(crops: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Haematoxylin / eosin in a central disc of the nucleus' equivalent radius (mean; haematoxylin std) and around it.

    ``crops`` ``(n, s, s, 3)`` uint8 centred on the nuclei, ``radius`` ``(n,)`` in crop pixels; returns ``(n, 5)``,
    one column per name of :data:`STAIN_COLUMNS` in that order (name them with :func:`stain_columns`).
    """
    n, s = crops.shape[0], crops.shape[1]
    stains = hed(crops).reshape(n, 2, s * s)
    yy, xx = np.mgrid[:s, :s]
    r2 = ((yy + 0.5 - s / 2) ** 2 + (xx + 0.5 - s / 2) ** 2).ravel()
    inside = (r2[None, :] <= np.maximum(radius, 1.0)[:, None] ** 2).astype(np.float32)  # (n, s*s)
    n_in = np.maximum(inside.sum(axis=1), 1)[:, None]
    n_out = np.maximum(s * s - inside.sum(axis=1), 1)[:, None]
    total = stains.sum(axis=2)
    nucleus = np.einsum("nkp,np->nk", stains, inside)
    h2 = np.einsum("np,np->n", stains[:, 0] ** 2, inside)[:, None] / n_in
    h_std = np.sqrt(np.maximum(h2 - (nucleus[:, :1] / n_in) ** 2, 0))  # chromatin texture
    # (n, STAIN_COLUMNS): [H_in, E_in, H_out, E_out, H_in_std]
    return np.concatenate([nucleus / n_in, (total - nucleus) / n_out, h_std], axis=1)


def stain_columns(values: np.ndarray) -> dict[str, np.ndarray]:
    """The ``(n, 5)`` output of :func:`nucleus_stains` as ``{column name: values}``."""
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[1] != len(STAIN_COLUMNS):
        msg = f"Expected ({len(values)}, {len(STAIN_COLUMNS)}) stain values, got shape {values.shape}."
        raise ValueError(msg)
    return {name: values[:, j] for j, name in enumerate(STAIN_COLUMNS)}
