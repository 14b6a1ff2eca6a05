"""A generated H&E-like tissue with known nuclei, cell types and expression: :func:`synthetic`.

Everything is drawn from one seed. Per section: a tissue mask, smooth random "niche" fields that
decide the local mix of cell types, nuclei placed without overlap (each type with its own size,
elongation, stain intensity and chromatin texture), an image rendered by Beer-Lambert from
haematoxylin and eosin optical densities (the stain vectors of :data:`skimage.color.rgb_from_hed`),
and spot / bulk counts drawn as Poisson counts of the summed true expression of the cells.

Geometry follows spatialdata: pixel ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)``, so its
centre is at ``(col + 0.5, row + 0.5)``. A nucleus polygon covers exactly the pixels whose centre lies
inside it (``skimage.draw.polygon(y - 0.5, x - 0.5)`` gives its mask back).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy import ndimage

from bitro._constants import Key
from bitro._logging import logger

#: The per-cell counts table of ``synthetic(layout="cells")``, named as spatialdata-io names Xenium's.
XENIUM_TABLE = "table"

if TYPE_CHECKING:
    from spatialdata import SpatialData


@dataclass(frozen=True)
class _Morphology:
    """How one cell type looks (lengths in micrometres, stain amounts in natural-log optical density units)."""

    name: str
    semi_axes_um: tuple[float, float]  # nucleus semi-major, semi-minor axis
    haematoxylin: float  # mean haematoxylin amount of the nucleus
    chromatin: float  # relative amplitude of the chromatin texture
    chromatin_grain_um: float  # grain size of the chromatin texture
    irregularity: float  # amplitude of the outline's low harmonics (0: an ellipse)
    cytoplasm_um: float  # width of the cell body around the nucleus
    cytoplasm_eosin: float  # eosin amount of the cell body
    spacing: float  # closest centre distance, in nucleus radii (room for the cell body)
    density: float  # fraction of placement candidates kept: sparser cells in stroma
    aligned: bool  # orientation follows the local stroma fibres


#: Cell types, in the order they are used (``n_cell_types`` takes the first ones). They differ in
#: nucleus size, elongation, haematoxylin intensity and texture, as real ones do.
CELL_TYPES: tuple[_Morphology, ...] = (
    _Morphology("epithelial", (5.2, 4.0), 1.1, 0.25, 0.9, 0.06, 5.0, 0.60, 1.5, 1.0, False),
    _Morphology("lymphocyte", (2.7, 2.5), 1.8, 0.08, 0.4, 0.03, 0.8, 0.50, 1.3, 1.0, False),
    _Morphology("fibroblast", (7.0, 1.7), 1.5, 0.10, 0.4, 0.03, 0.8, 0.70, 1.15, 0.4, True),
    _Morphology("macrophage", (4.0, 3.1), 0.9, 0.15, 0.4, 0.14, 3.0, 0.35, 1.6, 0.7, False),
    _Morphology("plasma", (3.3, 2.8), 1.5, 0.30, 0.9, 0.04, 2.5, 0.50, 1.4, 0.9, False),
    _Morphology("endothelial", (5.5, 1.4), 1.2, 0.08, 0.4, 0.03, 0.6, 0.60, 1.15, 0.5, True),
)

_N_VERTICES = 32  # vertices of a nucleus polygon
_GAP_UM = 1.5  # smallest background gap between two nuclei
_BLUR_UM = 0.35  # optical blur (Gaussian sigma)
_STROMA_EOSIN = 0.45  # eosin of the extracellular matrix
_FIBRE_EOSIN = 0.35  # extra eosin of collagen fibres
_CYTOPLASM_HAEMATOXYLIN = 0.25  # haematoxylin of cell bodies
_MEMBRANE_EOSIN = 0.2  # extra eosin on the border between two cell bodies
_TISSUE_HAEMATOXYLIN = 0.12  # haematoxylin counterstain of all tissue
_NUCLEUS_EOSIN = 0.15  # eosin inside nuclei
_NICHE_CONTRAST = 4.0  # how sharply the niche fields separate the cell types
_CELL_FACTOR_SD = 0.25  # log-normal spread of a cell's expression around its type profile


def _check(
    *,
    n_samples: int,
    size: int,
    pixel_size: float,
    n_cell_types: int,
    n_genes: int,
    n_markers: int,
    spot_diameter_um: float,
    spot_pitch_um: float,
    niche_size_um: float,
    tissue_fraction: float,
    counts_per_cell: float,
    ambient: float,
    **_,
) -> None:
    """Raise a clear error for a parameter that cannot work, before anything is generated."""
    names = [m.name for m in CELL_TYPES]
    checks = [
        (int(n_samples) == n_samples >= 1, f"`n_samples` must be a positive integer, got {n_samples!r}."),
        (
            int(n_cell_types) == n_cell_types and 1 <= n_cell_types <= len(CELL_TYPES),
            f"`n_cell_types` must be an integer from 1 to {len(CELL_TYPES)} (the morphologies bitro draws: "
            f"{names}), got {n_cell_types!r}.",
        ),
        (
            np.isfinite(pixel_size) and 0 < pixel_size <= 1,
            f"`pixel_size` must be in (0, 1] micrometres per pixel, so that nuclei span several pixels; "
            f"got {pixel_size!r}.",
        ),
        (
            np.isfinite(spot_diameter_um) and spot_diameter_um > 0,
            f"`spot_diameter_um` must be a positive number of micrometres, got {spot_diameter_um!r}.",
        ),
        (
            np.isfinite(spot_pitch_um) and spot_pitch_um >= spot_diameter_um,
            f"`spot_pitch_um` ({spot_pitch_um!r}) must be at least `spot_diameter_um` ({spot_diameter_um!r}): "
            "spots must not overlap.",
        ),
        (int(n_markers) == n_markers >= 0, f"`n_markers` must be an integer >= 0, got {n_markers!r}."),
        (
            int(n_genes) == n_genes >= max(1, n_cell_types * n_markers),
            f"`n_genes` ({n_genes!r}) must be an integer of at least `n_cell_types * n_markers` "
            f"({n_cell_types} * {n_markers}), so that every type gets its own marker genes.",
        ),
        (0 < tissue_fraction <= 1, f"`tissue_fraction` must be in (0, 1], got {tissue_fraction!r}."),
        (niche_size_um > 0, f"`niche_size_um` must be a positive number of micrometres, got {niche_size_um!r}."),
        (counts_per_cell > 0, f"`counts_per_cell` must be positive, got {counts_per_cell!r}."),
        (ambient >= 0, f"`ambient` must be >= 0, got {ambient!r}."),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    diameter_px = spot_diameter_um / pixel_size
    if int(size) != size or size < diameter_px + 2:
        msg = (
            f"`size` ({size!r} px) is too small to hold one spot of {spot_diameter_um} um "
            f"({diameter_px:.0f} px at {pixel_size} um/px): use an integer `size` >= {int(np.ceil(diameter_px)) + 2}."
        )
        raise ValueError(msg)


def _type_profiles(
    rng: np.random.Generator, n_types: int, n_genes: int, n_markers: int, counts_per_cell: float
) -> tuple[np.ndarray, np.ndarray]:
    """Mean expected counts per cell of each type (types x genes) and the marker type of each gene (-1: none)."""
    base = rng.normal(0.0, 0.5, n_genes)
    log_rates = base[None, :] + rng.normal(0.0, 0.5, (n_types, n_genes))
    marker_of = np.full(n_genes, -1)
    genes = rng.permutation(n_genes)
    for t in range(n_types):
        marked = genes[t * n_markers : (t + 1) * n_markers]
        marker_of[marked] = t
        log_rates[t, marked] += np.log(8.0)
    rates = np.exp(log_rates)
    return rates / rates.sum(axis=1, keepdims=True) * counts_per_cell, marker_of


def _smooth_fields(rng: np.random.Generator, size: int, sigma_px: float, n: int = 1) -> tuple[np.ndarray, int]:
    """``n`` smooth Gaussian random fields of unit spread on a coarse grid of ``step`` pixels: ``(fields, step)``."""
    step = max(1, int(sigma_px / 4))
    noise = rng.standard_normal((n, size // step + 2, size // step + 2), dtype=np.float32)
    fields = ndimage.gaussian_filter(noise, (0, sigma_px / step, sigma_px / step), mode="wrap")
    fields -= fields.mean(axis=(1, 2), keepdims=True)
    fields /= fields.std(axis=(1, 2), keepdims=True) + 1e-12
    return fields, step


def _at(fields: np.ndarray, step: int, xy: np.ndarray) -> np.ndarray:
    """Values ``(n, points)`` of coarse fields at pixel positions ``xy``."""
    coords = np.stack([xy[:, 1], xy[:, 0]]) / step - 0.5  # coarse cell k is centred on pixel (k + 0.5) * step
    return np.stack([ndimage.map_coordinates(f, coords, order=1) for f in fields])


def _full(field: np.ndarray, step: int, size: int) -> np.ndarray:
    """A coarse field bilinearly interpolated to ``size x size`` pixels (pixel centres as in :func:`_at`)."""
    from PIL import Image

    coarse = Image.fromarray(np.ascontiguousarray(field, dtype=np.float32), mode="F")
    return np.asarray(coarse.resize((size, size), Image.Resampling.BILINEAR, box=(0, 0, size / step, size / step)))


def _texture(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    """Fine Gaussian noise of unit spread (chromatin, stroma grain); grains over 1.5 px are made at lower resolution."""
    step = max(1, round(sigma_px))
    n = -(-size // step)
    f = ndimage.gaussian_filter(rng.standard_normal((n, n), dtype=np.float32), sigma_px / step)
    f = _full(f, step, size) if step > 1 else f
    return f / (f.std() + 1e-12)


def _outlines(
    rng: np.random.Generator, centres: np.ndarray, types: np.ndarray, angle: np.ndarray, pixel_size: float
) -> np.ndarray:
    """Nucleus outlines ``(n, vertices, 2)`` in pixels: perturbed ellipses, per-cell size jitter."""
    n = len(centres)
    axes = np.array([m.semi_axes_um for m in CELL_TYPES])[types] / pixel_size
    axes = axes * rng.lognormal(0.0, 0.1, (n, 1)) * np.c_[np.ones(n), rng.lognormal(0.0, 0.08, n)]
    irregularity = np.array([m.irregularity for m in CELL_TYPES])[types]
    t = np.linspace(0.0, 2 * np.pi, _N_VERTICES, endpoint=False)
    harmonics = np.arange(2, 5)
    amp = rng.standard_normal((n, len(harmonics))) / harmonics * irregularity[:, None]
    phase = rng.uniform(0, 2 * np.pi, (n, len(harmonics)))
    radial = 1 + np.einsum("nk,nkt->nt", amp, np.cos(harmonics[None, :, None] * t + phase[:, :, None]))
    u = axes[:, :1] * np.cos(t) * radial
    v = axes[:, 1:] * np.sin(t) * radial
    c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
    return np.stack([centres[:, :1] + c * u - s * v, centres[:, 1:] + s * u + c * v], axis=-1)


def _scaled(outlines: np.ndarray, centres: np.ndarray, factor: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Outlines scaled about their centres by ``factor`` and pushed out by ``margin`` pixels."""
    d = outlines - centres[:, None, :]
    norm = np.linalg.norm(d, axis=-1, keepdims=True)
    return centres[:, None, :] + d * factor[:, None, None] + d / np.maximum(norm, 1e-9) * margin


def _conflicts(zones: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)`` of exclusion zones (outlines ``(n, vertices, 2)``) that intersect, each pair both ways."""
    import shapely
    from scipy.spatial import cKDTree

    radial = np.linalg.norm(zones - centres[:, None, :], axis=-1)
    inner = radial.min(axis=1) * np.cos(np.pi / zones.shape[1])  # inside every edge
    outer = radial.max(axis=1)
    i, j = cKDTree(centres).query_pairs(2 * outer.max(), output_type="ndarray").T
    d = np.linalg.norm(centres[i] - centres[j], axis=1)
    sure = d < inner[i] + inner[j]
    maybe = ~sure & (d < outer[i] + outer[j])
    polygons = shapely.polygons(zones)
    hit = sure.copy()
    hit[maybe] = shapely.intersects(polygons[i[maybe]], polygons[j[maybe]])
    i, j = i[hit], j[hit]
    return np.r_[i, j], np.r_[j, i]


def _place_cells(
    rng: np.random.Generator,
    tissue: np.ndarray,
    n_types: int,
    niche_px: float,
    angle_fields: tuple[np.ndarray, int],
    pixel_size: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Cell types and nucleus outlines: niche-driven types, no two nuclei closer than the gap."""
    size = tissue.shape[0]
    types_used = CELL_TYPES[:n_types]
    # candidates: a jittered grid fine enough for the smallest cells
    step = 2 * min(np.sqrt(np.prod(m.semi_axes_um)) * m.spacing for m in types_used) / pixel_size
    grid = np.arange(step / 2, size, step)
    gx, gy = np.meshgrid(grid, grid)
    centres = np.c_[gx.ravel(), gy.ravel()] + rng.uniform(-step / 2, step / 2, (gx.size, 2))
    centres = centres[(centres >= 0).all(axis=1) & (centres < size).all(axis=1)]
    centres = centres[tissue[centres[:, 1].astype(int), centres[:, 0].astype(int)]]

    # niche fields -> local type probabilities -> a type per candidate; sparser types are thinned
    niches = _at(*_smooth_fields(rng, size, niche_px, n_types), centres) * _NICHE_CONTRAST
    p = np.exp(niches - niches.max(axis=0))
    cumulative = np.cumsum(p / p.sum(axis=0), axis=0)
    types = (cumulative < rng.uniform(size=len(centres))[None, :]).sum(axis=0).clip(max=n_types - 1)
    keep = rng.uniform(size=len(centres)) < np.array([m.density for m in CELL_TYPES])[types]
    centres, types = centres[keep], types[keep]

    fibre_angle = _at(*angle_fields, centres)[0] * (np.pi / 2)
    aligned = np.array([m.aligned for m in CELL_TYPES])[types]
    along = fibre_angle + rng.normal(0, 0.2, len(centres))
    angle = np.where(aligned, along, rng.uniform(0, np.pi, len(centres)))
    outlines = _outlines(rng, centres, types, angle, pixel_size)

    # resolve conflicts: big cells first; a cell is dropped when its exclusion zone meets a kept one's
    spacing = np.array([m.spacing for m in CELL_TYPES])[types]
    zones = _scaled(outlines, centres, spacing, _GAP_UM / pixel_size / 2)
    area = np.prod([m.semi_axes_um for m in CELL_TYPES], axis=1)[types] * spacing**2
    inside = (outlines >= 1).all(axis=(1, 2)) & (outlines <= size - 1).all(axis=(1, 2))
    order = np.lexsort((rng.uniform(size=len(centres)), -area))
    order = order[inside[order]]
    src, dst = _conflicts(zones, centres)
    neighbours = dst[np.argsort(src, kind="stable")]
    bounds = np.r_[0, np.cumsum(np.bincount(src, minlength=len(centres)))]
    blocked = np.zeros(len(centres), dtype=bool)
    kept = []
    for i in order:
        if not blocked[i]:
            kept.append(i)
            blocked[neighbours[bounds[i] : bounds[i + 1]]] = True
    kept = np.sort(np.asarray(kept, dtype=int))
    return types[kept], outlines[kept]


def _tissue(rng: np.random.Generator, size: int, fraction: float, pixel_size: float) -> np.ndarray:
    """A blob-shaped tissue mask with ragged edges and a few lumens, covering about ``fraction`` of the image.

    The image centre is always tissue, so that the central spot exists.
    """
    fine, step = _smooth_fields(rng, size, 20.0 / pixel_size, 2)
    coarse = ndimage.gaussian_filter(rng.standard_normal(fine.shape[1:], dtype=np.float32), size / 8 / step)
    coarse /= coarse.std() + 1e-12
    r = (np.arange(fine.shape[1]) + 0.5) * step / (size / 2) - 1
    field = 0.6 * coarse + 0.12 * fine[0] - 2.0 * (r[:, None] ** 2 + r[None, :] ** 2)
    n = size // step
    centre = field[n // 2, n // 2]
    field -= min(np.quantile(field[:n, :n], 1 - fraction), centre - 0.01)
    field = np.minimum(field, 0.5 * (2.6 - fine[1]))  # lumens where the second fine field peaks
    tissue = _full(field, step, size) >= 0
    tissue[size // 2, size // 2] = True
    return tissue


def _fibres(
    rng: np.random.Generator, tissue: np.ndarray, angle_fields: tuple[np.ndarray, int], pixel_size: float
) -> np.ndarray:
    """Collagen-like fibres in ``[0, 1]``: short strokes along the local fibre direction, one per 40 um^2 of tissue."""
    size = tissue.shape[0]
    n = int(tissue.sum() * pixel_size**2 / 40.0)
    start = rng.uniform(0, size, (n, 2))
    theta = _at(*angle_fields, start)[0] * (np.pi / 2) + rng.normal(0, 0.15, n)
    length = rng.uniform(8.0, 25.0, n) / pixel_size
    strength = rng.uniform(0.3, 1.0, n)
    steps = np.arange(int(length.max()) + 1)
    t = steps[None, :] * (steps[None, :] <= length[:, None])  # points past a stroke's end repeat its start
    x = (start[:, :1] + t * np.cos(theta)[:, None]).astype(int).clip(0, size - 1)
    y = (start[:, 1:] + t * np.sin(theta)[:, None]).astype(int).clip(0, size - 1)
    weight = np.broadcast_to(strength[:, None], x.shape) * (steps[None, :] <= length[:, None])
    out = np.bincount((y * size + x).ravel(), weights=weight.ravel(), minlength=size * size).reshape(size, size)
    return out.clip(0, 1).astype(np.float32) * tissue


def _nucleus_pixels(outlines: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(cell, row, col)`` of every pixel whose centre lies inside a nucleus outline (vectorised rasteriser)."""
    import shapely

    lo = np.floor(outlines.min(axis=1) - 0.5).astype(int)
    width = np.ceil(outlines.max(axis=1) - 0.5).astype(int) - lo + 1
    n = width[:, 0] * width[:, 1]
    cell = np.repeat(np.arange(len(outlines)), n)
    k = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    col, row = lo[cell, 0] + k % width[cell, 0], lo[cell, 1] + k // width[cell, 0]
    polygons = shapely.polygons(outlines)
    shapely.prepare(polygons)
    inside = shapely.contains_xy(polygons[cell], col + 0.5, row + 0.5)
    return cell[inside], row[inside], col[inside]


def _render(
    rng: np.random.Generator,
    tissue: np.ndarray,
    angle_fields: tuple[np.ndarray, int],
    types: np.ndarray,
    outlines: np.ndarray,
    pixel_size: float,
) -> np.ndarray:
    """The H&E image ``(3, y, x)`` uint8: haematoxylin and eosin amounts -> Beer-Lambert RGB."""
    from skimage.color import rgb_from_hed

    size = tissue.shape[0]
    mask = tissue.astype(np.float32)
    low_fields, step = _smooth_fields(rng, size, 30.0 / pixel_size)
    low = _full(low_fields[0], step, size)
    grains = {g: _texture(rng, size, g / pixel_size) for g in sorted({m.chromatin_grain_um for m in CELL_TYPES})}
    coarse_grain = grains[max(grains)]
    h = mask * _TISSUE_HAEMATOXYLIN * (1 + 0.3 * low).clip(0.2)
    e = mask * _STROMA_EOSIN * (1 + 0.15 * low + 0.1 * coarse_grain).clip(0.2)
    e += _FIBRE_EOSIN * _fibres(rng, tissue, angle_fields, pixel_size)

    # cell bodies: the pixels nearer to a nucleus than its type's cytoplasm margin (a Voronoi partition)
    cell, row, col = _nucleus_pixels(outlines)
    # (on a ~1 um grid: cell bodies need no sub-micrometre precision), with faint membranes between them
    f = max(1, round(1.0 / pixel_size))
    labels = np.zeros((size, size), dtype=np.int32)
    labels[row, col] = cell + 1
    distance, (iy, ix) = ndimage.distance_transform_edt(labels[::f, ::f] == 0, return_indices=True)
    owner = labels[::f, ::f][iy, ix] - 1
    margin = np.array([m.cytoplasm_um for m in CELL_TYPES])[types] / (pixel_size * f)
    outside = (distance - margin[owner]).astype(np.float32)  # <= 0 inside a cell body
    membrane = (outside <= 0) & ((owner != np.roll(owner, 1, axis=0)) | (owner != np.roll(owner, 1, axis=1)))
    inside = (_full(outside, f, size) <= 0) if f > 1 else outside <= 0  # smooth outline at full resolution
    owner = owner.repeat(f, axis=0).repeat(f, axis=1)[:size, :size]
    body = np.nonzero(inside & (labels == 0))
    cyto = np.array([m.cytoplasm_eosin for m in CELL_TYPES])[types]
    e[body] = cyto[owner[body]] * (1 + 0.1 * coarse_grain[body])
    h[body] = np.maximum(h[body], _CYTOPLASM_HAEMATOXYLIN)
    membrane = membrane.repeat(f, axis=0).repeat(f, axis=1)[:size, :size] & (labels == 0)
    e[membrane] += _MEMBRANE_EOSIN

    # nuclei: haematoxylin with a type-specific chromatin texture
    texture = np.empty(len(cell), dtype=np.float32)
    t = types[cell]
    for g, field in grains.items():
        sel = np.array([m.chromatin_grain_um == g for m in CELL_TYPES])[t]
        texture[sel] = field[row[sel], col[sel]]
    level = np.array([m.haematoxylin for m in CELL_TYPES])[types] * rng.lognormal(0.0, 0.08, len(types))
    chromatin = np.array([m.chromatin for m in CELL_TYPES])[t]
    h[row, col] = level[cell] * (1 + chromatin * texture).clip(0.4)
    e[row, col] = _NUCLEUS_EOSIN

    blur = _BLUR_UM / pixel_size
    h, e = ndimage.gaussian_filter(h, blur), ndimage.gaussian_filter(e, blur)
    rgb = np.empty((3, size, size), dtype=np.uint8)
    for c, (hc, ec) in enumerate(zip(rgb_from_hed[0], rgb_from_hed[1], strict=True)):  # Beer-Lambert per channel
        od = h * np.float32(hc)
        od += e * np.float32(ec)
        np.exp(-od, out=od)
        od *= 255
        od += 0.5
        rgb[c] = od
    return rgb


def _spot_grid(size: int, tissue: np.ndarray, radius_px: float, pitch_px: float):
    """Hexagonal spot grid centred on the image: centres (pixels), array rows / columns; spots under tissue only."""
    row_step = pitch_px * np.sqrt(3) / 2
    n_rows, n_cols = int(size / 2 // row_step) + 1, int(size / 2 // pitch_px) + 1
    r, j = np.meshgrid(np.arange(-n_rows, n_rows + 1), np.arange(-n_cols - 1, n_cols + 1), indexing="ij")
    r, j = r.ravel(), j.ravel()
    x = size / 2 + (j + 0.5 * (r % 2)) * pitch_px
    y = size / 2 + r * row_step
    fits = (x - radius_px >= 0) & (x + radius_px <= size) & (y - radius_px >= 0) & (y + radius_px <= size)
    fits &= tissue[y.astype(int).clip(0, size - 1), x.astype(int).clip(0, size - 1)]
    x, y, r, j = x[fits], y[fits], r[fits], j[fits]
    cols = 2 * j + r % 2
    return np.c_[x, y], r - r.min(), cols - cols.min()


def _section(
    seed: np.random.SeedSequence,
    *,
    profiles: np.ndarray,
    size: int,
    pixel_size: float,
    niche_size_um: float,
    tissue_fraction: float,
    spot_diameter_um: float,
    spot_pitch_um: float,
    ambient: float,
) -> dict:
    """Generate one section: image, nuclei, truth and counts (numpy only, so that it runs on any worker)."""
    import shapely
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    niche_px = niche_size_um / pixel_size
    tissue = _tissue(rng, size, tissue_fraction, pixel_size)
    angle_fields = _smooth_fields(rng, size, niche_px)  # local direction of stroma fibres
    types, outlines = _place_cells(rng, tissue, len(profiles), niche_px, angle_fields, pixel_size)
    image = _render(rng, tissue, angle_fields, types, outlines, pixel_size)
    polygons = shapely.polygons(outlines)
    centroids = shapely.get_coordinates(shapely.centroid(polygons))

    factor = rng.lognormal(-(_CELL_FACTOR_SD**2) / 2, _CELL_FACTOR_SD, len(types))
    truth = (profiles[types] * factor[:, None]).astype(np.float32)

    radius_px = spot_diameter_um / pixel_size / 2
    xy, rows, cols = _spot_grid(size, tissue, radius_px, spot_pitch_um / pixel_size)
    dist, nearest = cKDTree(xy).query(centroids)
    in_spot = dist <= radius_px
    expected = np.zeros((len(xy), truth.shape[1]))
    np.add.at(expected, nearest[in_spot], truth[in_spot])
    expected += ambient * expected.mean(axis=0, keepdims=True)
    return {
        "image": image,
        "polygons": polygons,
        "centroids": centroids,
        "types": types,
        "truth": truth,
        "spots_xy": xy,
        "array_row": rows,
        "array_col": cols,
        "radius_px": radius_px,
        "spot_counts": rng.poisson(expected).astype(np.float32),
        "bulk_counts": rng.poisson(truth.sum(axis=0, dtype=np.float64)).astype(np.float32),
    }


def _morphology_table(n_types: int) -> pd.DataFrame:
    """The morphology parameters of the first ``n_types`` cell types, one numeric column each (for ``.uns``)."""
    table = pd.DataFrame([asdict(m) for m in CELL_TYPES[:n_types]]).set_index("name")
    table[["semi_major_um", "semi_minor_um"]] = table.pop("semi_axes_um").tolist()
    return table


def synthetic(
    n_samples: int = 3,
    *,
    size: int = 2048,
    pixel_size: float = 0.5,
    n_cell_types: int = 4,
    n_genes: int = 60,
    n_markers: int = 5,
    spot_diameter_um: float = 55.0,
    spot_pitch_um: float = 100.0,
    niche_size_um: float = 120.0,
    tissue_fraction: float = 0.8,
    counts_per_cell: float = 100.0,
    ambient: float = 0.05,
    bulk: bool = False,
    layout: Literal["spots", "cells"] = "spots",
    seed: int = 0,
) -> SpatialData:
    """Generate H&E-like tissue sections with known nuclei, cell types and expression.

    Each section is a square H&E image (Beer-Lambert from haematoxylin and eosin optical densities,
    with the stain vectors of :data:`skimage.color.rgb_from_hed`): eosin-stained textured stroma and
    cytoplasm, white background outside an irregular tissue mask, and non-overlapping nuclei with
    chromatin texture and a slight blur. Cell types are laid out in spatial niches (smooth random
    fields), so that neighbouring spots look alike and spots differ in composition. Types differ in
    nucleus size, elongation, stain intensity and texture (see ``CELL_TYPES`` in this module):
    epithelial (large, pale, coarse chromatin), lymphocyte (small, round, dark), fibroblast
    (elongated, along the stroma fibres), macrophage (medium, irregular, pale), plasma, endothelial.

    Expression: each type has a mean profile (log-normal rates, ``n_markers`` marker genes 8-fold up);
    a cell's true expression is its type profile times a log-normal per-cell factor; a spot's counts are
    Poisson draws of the sum over the cells whose centroid lies inside the spot circle, plus an ambient
    term (``ambient`` times the section's mean spot profile); a slide's bulk profile is a Poisson draw of
    the sum over all its cells. The same seed gives the same data, and section ``i`` does not depend on
    ``n_samples``.

    .. image:: /_static/synthetic.png
       :alt: A synthetic section with its spots, a crop, and the true nuclei coloured by cell type.

    Parameters
    ----------
    n_samples
        Number of sections, named ``"synth0"``, ``"synth1"``, ...
    size
        Edge length of each (square) image, in pixels.
    pixel_size
        Micrometres per pixel (at most 1, so that nuclei span several pixels).
    n_cell_types
        Number of cell types (at most 6).
    n_genes
        Number of genes, named ``"GENE00"``, ``"GENE01"``, ...
    n_markers
        Marker genes per cell type (each gene marks at most one type).
    spot_diameter_um
        Spot diameter in micrometres (55 for Visium, 100 for legacy ST).
    spot_pitch_um
        Centre-to-centre distance of neighbouring spots on the hexagonal grid, in micrometres.
    niche_size_um
        Length scale of the cell-type niches, in micrometres.
    tissue_fraction
        Approximate fraction of the image covered by tissue.
    counts_per_cell
        Expected total counts of an average cell.
    ambient
        Ambient counts added to every spot, as a fraction of the section's mean spot profile.
    bulk
        Also make a ``"bulk"`` table with one profile per section.
    layout
        ``"spots"``: spot-based data (Visium-like, tables ``"spots"`` and ``"truth"``). ``"cells"``: cell-resolved
        data as spatialdata-io lays out Xenium: no spots; table ``"table"`` holds each true cell's raw counts
        (Poisson draws of its true expression), annotating ``"{s}_true_nuclei"`` (region key ``"region"``,
        instance key ``"cell_id"``); ``"truth"`` is kept. Train on it through :func:`bitro.pp.pseudo_spots`.
    seed
        Random seed.

    Returns
    -------
    A SpatialData with, per section ``s``: image ``"{s}_image"``, spot circles ``"{s}_spots"`` and
    ground-truth nucleus polygons ``"{s}_true_nuclei"`` (column ``"cell_type"``), in the coordinate
    systems ``"{s}"`` (pixels) and ``"{s}_um"`` (micrometres); tables ``"spots"`` (raw counts,
    ``.obs["sample"]``, ``.obs["array_row"]``, ``.obs["array_col"]``, ``.obsm["spatial"]``),
    ``"truth"`` (one row per cell annotating ``"{s}_true_nuclei"``: ``.X`` the true expression in
    expected counts, ``.obs["cell_type"]``, ``.obs["sample"]``, ``.obsm["spatial"]`` the centroid in
    pixels, ``.var["marker_of"]``, ``.uns["bitro"]["synthetic"]`` the parameters and the type
    profiles) and, with ``bulk=True``, ``"bulk"`` (one row per section, raw counts).
    Pixel ``(row, col)`` has its centre at ``(col + 0.5, row + 0.5)``; a nucleus polygon covers exactly
    the pixels whose centre lies inside it.

    Examples
    --------
    >>> import bitro as bt
    >>> sdata = bt.datasets.synthetic(2, size=1024)
    >>> sdata["truth"].obs["cell_type"].value_counts()  # doctest: +SKIP
    """
    import anndata as ad
    import scipy.sparse as sp
    from spatialdata import SpatialData

    from bitro._parallel import map_tasks
    from bitro.io._build import (
        bulk_table,
        cells_table,
        image_element,
        polygons_element,
        spots_element,
        spots_table,
    )

    params = {
        "n_samples": n_samples,
        "size": size,
        "pixel_size": pixel_size,
        "n_cell_types": n_cell_types,
        "n_genes": n_genes,
        "n_markers": n_markers,
        "spot_diameter_um": spot_diameter_um,
        "spot_pitch_um": spot_pitch_um,
        "niche_size_um": niche_size_um,
        "tissue_fraction": tissue_fraction,
        "counts_per_cell": counts_per_cell,
        "ambient": ambient,
        "bulk": bulk,
        "seed": seed,
    }
    _check(**params)
    if layout not in ("spots", "cells"):
        msg = f"layout={layout!r}: use 'spots' (Visium-like) or 'cells' (cell-resolved, Xenium-like)."
        raise ValueError(msg)
    seeds = np.random.SeedSequence(seed).spawn(n_samples + 1)
    rng = np.random.default_rng(seeds[0])
    profiles, marker_of = _type_profiles(rng, n_cell_types, n_genes, n_markers, counts_per_cell)
    names = [m.name for m in CELL_TYPES[:n_cell_types]]
    width = max(2, len(str(n_genes - 1)))
    genes = pd.Index([f"GENE{g:0{width}d}" for g in range(n_genes)])
    samples = [f"synth{i}" for i in range(n_samples)]
    logger.info("Generating %d synthetic sections of %d x %d px.", n_samples, size, size)
    generate = partial(
        _section,
        profiles=profiles,
        size=size,
        pixel_size=pixel_size,
        niche_size_um=niche_size_um,
        tissue_fraction=tissue_fraction,
        spot_diameter_um=spot_diameter_um,
        spot_pitch_um=spot_pitch_um,
        ambient=ambient,
    )
    sections = map_tasks(generate, seeds[1:], desc="synthetic sections")

    images, shapes, spot_tables, truth_tables, bulk_rows = {}, {}, [], [], []
    for s, sec in zip(samples, sections, strict=True):
        cell_type = pd.Categorical.from_codes(sec["types"], categories=names)
        cell_ids = [str(i) for i in range(len(cell_type))]
        spot_ids = [f"{c}x{r}" for r, c in zip(sec["array_row"], sec["array_col"], strict=True)]
        images[Key.image(s)] = image_element(sec["image"], s, pixel_size)
        shapes[Key.spots(s)] = spots_element(sec["spots_xy"], sec["radius_px"], spot_ids, s, pixel_size)
        nuclei = polygons_element(sec["polygons"], cell_ids, s, pixel_size)
        nuclei[Key.CELL_TYPE] = cell_type
        shapes[Key.true_nuclei(s)] = nuclei
        spot_obs = pd.DataFrame(
            {Key.SAMPLE: s, Key.ARRAY_ROW: sec["array_row"], Key.ARRAY_COL: sec["array_col"]},
            index=pd.Index(spot_ids),
        )
        spots = ad.AnnData(sp.csr_matrix(sec["spot_counts"]), obs=spot_obs, var=pd.DataFrame(index=genes))
        spots.obsm[Key.SPATIAL] = sec["spots_xy"]
        spot_tables.append(spots)
        cell_obs = pd.DataFrame({Key.SAMPLE: s, Key.CELL_TYPE: cell_type}, index=pd.Index(cell_ids))
        truth = ad.AnnData(sec["truth"], obs=cell_obs, var=pd.DataFrame(index=genes))
        truth.obsm[Key.SPATIAL] = sec["centroids"]
        truth_tables.append(truth)
        bulk_rows.append(sec["bulk_counts"])

    truth = cells_table(truth_tables, element=Key.true_nuclei)
    truth.obs[Key.CELL_TYPE] = pd.Categorical(truth.obs[Key.CELL_TYPE], categories=names)
    truth.var["marker_of"] = pd.Categorical.from_codes(marker_of, categories=names)  # -1: no marker
    truth.uns[Key.UNS] = {
        Key.SYNTHETIC: {
            **params,
            "cell_types": names,
            "profiles": profiles,
            "morphology": _morphology_table(n_cell_types),
        }
    }
    tables = {Key.SPOTS_TABLE: spots_table(spot_tables), Key.TRUTH_TABLE: truth}
    if layout == "cells":  # cell-resolved: per-cell counts, no spots
        del tables[Key.SPOTS_TABLE]
        shapes = {k: v for k, v in shapes.items() if not k.endswith(Key.SPOTS_SUFFIX)}
        counts = truth.copy()
        counts.X = sp.csr_matrix(np.random.default_rng([seed, 1]).poisson(np.asarray(truth.X)).astype(np.float32))
        del counts.uns[Key.UNS]
        tables[XENIUM_TABLE] = counts
    if bulk:
        tables[Key.BULK_TABLE] = bulk_table(np.vstack(bulk_rows), samples, genes)
    return SpatialData(images=images, shapes=shapes, tables=tables)
