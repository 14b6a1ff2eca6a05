"""Nucleus segmentation over overlapping tiles: the built-in CPU watershed, or a user's callable.

Per section: a subsampled overview of the image gives the tissue mask (tiles without tissue are
skipped) and one haematoxylin threshold (Otsu over tissue pixels) that every tile shares. Each tile
is read lazily, optionally block-averaged by ``downsample``, labelled, and vectorised; a nucleus is
kept only by the tile whose core holds its centroid, so nuclei on seams appear once.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from bitro._checks import check_rgb_image
from bitro._constants import Key
from bitro._deprecate import renamed_args
from bitro._logging import logger
from bitro._parallel import map_tasks
from bitro._settings import settings
from bitro._utils import scale0
from bitro.pp._tiles import Tile, TileReads, read_window, tile_grid

if TYPE_CHECKING:
    import geopandas as gpd
    import xarray as xr
    from dask.distributed import Client
    from spatialdata import SpatialData

    from bitro.io import Section

#: Mean optical density above which a pixel counts as tissue (Macenko's ``beta``).
TISSUE_OD = 0.15
#: Long edge (pixels) of the subsampled overview that the threshold and tissue mask come from.
OVERVIEW_SIZE = 2048
#: Fewest tissue pixels in the overview for a section to count as having tissue.
MIN_TISSUE_PIXELS = 64

#: Optical density of each uint8 intensity, ``-log(max(v, 1) / 255)``.
_OD_LUT = -np.log(np.maximum(np.arange(256, dtype=np.float32), 1.0) / 255.0)


def _haematoxylin_vector() -> np.ndarray:
    from skimage.color import hed_from_rgb

    return hed_from_rgb[:, 0].astype(np.float32)


def haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin density of a ``(y, x, 3)`` uint8 RGB array by colour deconvolution (Ruifrok & Johnston).

    The optical density of each channel is projected on the haematoxylin column of scikit-image's
    ``hed_from_rgb`` matrix, in float32.
    """
    return _OD_LUT[rgb] @ _haematoxylin_vector()


def _overview(image: xr.DataArray) -> tuple[np.ndarray, int]:
    """Every ``step``-th pixel of a ``(c, y, x)`` level as ``(y, x, 3)`` uint8, with ``step``."""
    step = max(1, math.ceil(max(image.sizes["y"], image.sizes["x"]) / OVERVIEW_SIZE))
    return read_window(image, slice(None, None, step), slice(None, None, step)), step


def _tissue_and_threshold(rgb: np.ndarray) -> tuple[np.ndarray, float | None]:
    """Tissue mask of an overview and the Otsu threshold of haematoxylin over its tissue (None: no tissue)."""
    from skimage.filters import threshold_otsu

    tissue = _OD_LUT[rgb].mean(axis=-1) > TISSUE_OD
    if tissue.sum() < MIN_TISSUE_PIXELS:
        return tissue, None
    return tissue, float(threshold_otsu(haematoxylin(rgb)[tissue]))


def _tiles_with_tissue(tiles: list[Tile], tissue: np.ndarray, step: int) -> list[Tile]:
    from scipy import ndimage as ndi

    near = ndi.binary_dilation(tissue, iterations=1)
    return [
        t
        for t in tiles
        if near[t.core_y0 // step : -(-t.core_y1 // step), t.core_x0 // step : -(-t.core_x1 // step)].any()
    ]


def watershed_nuclei(
    rgb: np.ndarray,
    *,
    threshold: float,
    sigma_px: float = 1.0,
    blob_sigma_px: float = 2.0,
    min_distance_px: int = 4,
    max_hole_px: int = 30,
) -> np.ndarray:
    """Label nuclei in a ``(y, x, 3)`` uint8 H&E array: haematoxylin threshold + seeded watershed.

    The mask is the smoothed haematoxylin density above ``threshold``, with small holes filled.
    Seeds are the local maxima of a more strongly smoothed density (one per nucleus: chromatin is
    densest inside a nucleus and thins out where two nuclei touch), and the watershed of that
    density grows them within the mask. This splits clumps of touching nuclei, which a watershed on
    the distance transform leaves whole when they form one round blob.

    Parameters
    ----------
    rgb
        The RGB pixels.
    threshold
        Haematoxylin density above which a pixel belongs to a nucleus (see :func:`haematoxylin`).
    sigma_px
        Gaussian smoothing (pixels) of the density before thresholding.
    blob_sigma_px
        Gaussian smoothing (pixels) of the density for the seeds and the watershed, about half a
        nucleus radius.
    min_distance_px
        Smallest distance (pixels) between two seeds.
    max_hole_px
        Holes of the mask up to this area (pixels) are filled (larger ones are lumens, not nuclei).

    Returns
    -------
    ``(y, x)`` int32 labels, 0 for background.
    """
    from scipy import ndimage as ndi
    from skimage.morphology import remove_small_holes
    from skimage.segmentation import watershed

    density = haematoxylin(rgb)
    mask = remove_small_holes(ndi.gaussian_filter(density, sigma_px) > threshold, max_size=max_hole_px)
    blobs = ndi.gaussian_filter(density, blob_sigma_px)
    # seeds: pixels that are the maximum of their (2 d + 1)^2 window; a plateau is one seed
    size = 2 * max(int(min_distance_px), 1) + 1
    seeds = (blobs == ndi.maximum_filter(blobs, size=size)) & mask & (blobs > threshold)
    markers, _ = ndi.label(seeds)
    return watershed(-blobs, markers, mask=mask).astype(np.int32, copy=False)


def _block_mean(rgb: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return rgb
    h, w = rgb.shape[0] // factor, rgb.shape[1] // factor
    blocks = rgb[: h * factor, : w * factor].reshape(h, factor, w, factor, 3)
    return (blocks.sum(axis=(1, 3), dtype=np.uint32) / factor**2 + 0.5).astype(np.uint8)


def _check_labels(labels: Any, shape: tuple[int, int], name: str) -> np.ndarray:
    if not isinstance(labels, np.ndarray) or labels.shape != shape or not np.issubdtype(labels.dtype, np.integer):
        shape_got, dtype_got = getattr(labels, "shape", None), getattr(labels, "dtype", None)
        got = f"{type(labels).__name__} of shape {shape_got} and dtype {dtype_got}"
        msg = (
            f"The segmentation method {name!r} must return an integer label image of shape {shape} "
            f"(the tile's height and width, 0 = background), got a {got}."
        )
        raise ValueError(msg)
    return labels


def _label_stats(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel count and centroid (row, col of pixel centres) of labels ``1..max``."""
    n = int(labels.max())
    flat = labels.ravel()
    count = np.bincount(flat, minlength=n + 1)[1:].astype(float)
    rows = np.repeat(np.arange(labels.shape[0], dtype=float), labels.shape[1])
    cols = np.tile(np.arange(labels.shape[1], dtype=float), labels.shape[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(flat, weights=rows, minlength=n + 1)[1:] / count
        cx = np.bincount(flat, weights=cols, minlength=n + 1)[1:] / count
    return count, cy, cx


def _outline(labels: np.ndarray, label: int, box: tuple[slice, slice]) -> np.ndarray:
    """Longest outline ``(n, 2)`` (row, col; pixel edges) of one label, in the coordinates of ``labels``."""
    from skimage.measure import find_contours

    inside = labels[box] == label
    padded = np.zeros((inside.shape[0] + 2, inside.shape[1] + 2), dtype=bool)
    padded[1:-1, 1:-1] = inside
    contour = max(find_contours(padded, 0.5), key=len)
    return contour + (box[0].start - 0.5, box[1].start - 0.5)  # -1 for the pad, +0.5 from centres to edges


def _segment_tile(
    task: tuple[Tile, np.ndarray],
    *,
    method: Callable[[np.ndarray], np.ndarray],
    name: str,
    downsample: int,
    min_area_px: float,
    max_area_px: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei owned by one tile: polygons in full-resolution pixels and their areas in full-resolution pixels."""
    import shapely
    from scipy import ndimage as ndi
    from skimage.segmentation import relabel_sequential

    tile, rgb = task
    rgb = _block_mean(rgb, downsample)
    labels = _check_labels(method(rgb), rgb.shape[:2], name)
    if labels.size == 0 or labels.max() <= 0:
        return np.zeros(0, dtype=object), np.zeros(0)
    labels = np.maximum(labels, 0).astype(np.intp, copy=False)
    if labels.max() > labels.size:  # sparse ids from a user's method: make them 1..n
        labels = relabel_sequential(labels)[0]
    count, cy, cx = _label_stats(labels)
    area = count * downsample**2
    keep = (area >= min_area_px) & (area <= max_area_px)
    keep &= tile.owns(tile.y0 + (cy + 0.5) * downsample, tile.x0 + (cx + 0.5) * downsample)
    boxes = ndi.find_objects(labels)
    outlines = [_outline(labels, i + 1, boxes[i]) for i in np.flatnonzero(keep)]
    if not outlines:
        return np.zeros(0, dtype=object), np.zeros(0)
    yx = np.concatenate(outlines) * downsample + (tile.y0, tile.x0)
    rings = shapely.linearrings(yx[:, ::-1], indices=np.repeat(np.arange(len(outlines)), [len(o) for o in outlines]))
    return shapely.polygons(rings), area[keep]


def cells_element(
    polygons: list, section: Section, sdata: SpatialData, *, columns: dict[str, Any] | None = None, index=None
) -> gpd.GeoDataFrame:
    """A polygon shapes element of a section (cell ids ``"{sample}_{i}"`` unless given), in its transformations."""
    import geopandas as gpd
    import pandas as pd
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    if index is None:
        index = [f"{section.sample}_{i}" for i in range(len(polygons))]
    index = pd.Index(index, name=Key.CELL_ID)
    gdf = gpd.GeoDataFrame(columns or {}, geometry=gpd.GeoSeries(list(polygons), index=index), index=index)
    transformations = get_transformation(sdata.images[section.image_key], get_all=True)
    return ShapesModel.parse(gdf, transformations=dict(transformations))


def record_segmentation(sdata: SpatialData, section: Section, key: str, *, written: bool = True, **info: Any) -> None:
    """Record how a section's cells were made in ``sdata.attrs["bitro"]["segmentation"][key]``.

    One record per cell shapes element (``key``, the ``key_added`` of the call), so two segmentations of a section
    under different names keep their own records; ``"shapes_key"`` is ``None`` when nothing was ``written`` (no
    nucleus found: spatialdata holds no empty shapes element).
    """
    record = {"sample": section.sample, "image_key": section.image_key, "shapes_key": key if written else None, **info}
    sdata.attrs.setdefault(Key.UNS, {}).setdefault(Key.SEGMENTATION, {})[key] = record


def segmentation_record(sdata: SpatialData, sample: str, key: str) -> dict[str, Any] | None:
    """The record of the cell shapes ``key`` of section ``sample``, if any.

    Also read from the per-section layout of bitro < 0.2 (keyed by the sample).
    """
    records = sdata.attrs.get(Key.UNS, {}).get(Key.SEGMENTATION, {})
    record, old = records.get(key), records.get(sample)
    if record is None and isinstance(old, dict) and "sample" not in old and old.get("shapes_key") in (key, None):
        record = old
    return dict(record) if record is not None else None


def _target_key(key_added: str | None, sections: list[Section]) -> None:
    if key_added is not None and len(sections) > 1:
        msg = (
            f"`key_added={key_added!r}` names one shapes element, but {len(sections)} sections would be segmented "
            f"({[s.sample for s in sections]}). Pass `image_key=` to pick one section, or leave `key_added=None` "
            f"to write '{{sample}}{Key.CELLS_SUFFIX}' for each."
        )
        raise ValueError(msg)


@renamed_args(sdata="data")
def segment_nuclei(
    data: SpatialData,
    *,
    image_key: str | Mapping[str, str] | None = None,
    method: Literal["watershed"] | Callable[[np.ndarray], np.ndarray] = "watershed",
    key_added: str | None = None,
    downsample: int = 1,
    tile_size: int | None = None,
    overlap: int = 64,
    min_area_um2: float = 10.0,
    max_area_um2: float = 150.0,
    threshold: float | None = None,
    sigma_um: float = 0.7,
    blob_sigma_um: float = 1.4,
    min_distance_um: float = 3.5,
    client: Client | None = None,
    n_jobs: int | None = None,
) -> None:
    """Segment nuclei on the H&E image of every section, tile by tile, into polygon shapes.

    The built-in ``"watershed"`` needs no model weights: haematoxylin density by colour
    deconvolution, a threshold shared by all tiles of a section (Otsu over the tissue pixels of a
    subsampled overview, unless ``threshold`` is given), and a watershed seeded at the local maxima
    of the smoothed density, which splits touching nuclei. Any other segmenter plugs in as
    ``method``, a function from an RGB tile to a label image. Tiles are read lazily with an overlap
    and each nucleus is kept by the one tile whose core holds its centroid. Tiles without tissue are
    skipped; a section without tissue (or without nuclei) gets a warning and no shapes element, as
    spatialdata has no empty shapes elements.

    On a whole 92-Mpx HER2ST section (C2, ~24,500 nuclei) this takes about 17 s of CPU time at full
    resolution and 10 s with ``downsample=2``, with a peak RSS of about 1 GB
    (``benchmarks/segmentation.py``).

    Parameters
    ----------
    data
        The SpatialData object; one shapes element per section is added (replacing one of the same name).
    image_key
        Segment only this image (one section), or a mapping ``{sample: image_key}`` (e.g. the
        stain-normalised copies, ``"{sample}_image_normalized"``); by default the image of every
        section (:func:`bitro.io.get_sections`).
    method
        ``"watershed"``, or a picklable function ``(tile: (y, x, 3) uint8 RGB) -> (y, x) int labels``
        (0 = background) that is run on every tile.
    key_added
        Name of the shapes element; by default ``"{sample}_cells"``. Only with a single section.
    downsample
        Segment on the image block-averaged by this integer factor (2 is about twice as fast and
        merges more touching nuclei; polygons are still written in full-resolution pixels).
    tile_size
        Edge (full-resolution pixels) of the square tile cores; by default ``bitro.settings.tile_size``.
    overlap
        Pixels (full resolution) read around each core; at least twice the diameter of the largest
        nucleus allowed by ``max_area_um2``, so that every kept nucleus is whole.
    min_area_um2, max_area_um2
        Keep nuclei whose area (square micrometres, from the section's pixel size) is in this range.
    threshold
        Haematoxylin density threshold (``"watershed"`` only); by default Otsu's, per section.
    sigma_um
        Gaussian smoothing (micrometres) of the haematoxylin density before the threshold
        (``"watershed"`` only).
    blob_sigma_um
        Gaussian smoothing (micrometres) of the density that seeds and floods the watershed.
    min_distance_um
        Smallest distance (micrometres) between two nucleus centres (``"watershed"`` only).
    client
        A :class:`dask.distributed.Client` to run the tiles on; the result is the same as a serial run.
    n_jobs
        Local processes when no client is given; by default ``bitro.settings.n_jobs``.

    Returns
    -------
    Nothing; adds to ``data``:

    - ``shapes["{sample}_cells"]`` (or ``key_added``): one polygon per nucleus in the section's
      full-resolution pixels and with the image's transformations, indexed by cell id
      ``"{sample}_{i}"``, with column ``"area_um2"``;
    - ``attrs["bitro"]["segmentation"]["{sample}_cells"]`` (or ``key_added``): the section, method, image, shapes
      key (``None`` when no nucleus was found), number of cells, threshold and parameters.

    Examples
    --------
    >>> import bitro as bt
    >>> sdata = bt.datasets.synthetic(n_samples=1, size=512)  # doctest: +SKIP
    >>> bt.pp.segment_nuclei(sdata)  # doctest: +SKIP
    >>> sdata["synth0_cells"].head()  # doctest: +SKIP
    """
    from bitro.io import get_sections

    if not (method == "watershed" or callable(method)):
        msg = f"`method` must be 'watershed' or a function (RGB tile -> label image), got {method!r}."
        raise ValueError(msg)
    tile_size = settings.tile_size if tile_size is None else tile_size
    if not isinstance(downsample, int | np.integer) or downsample < 1:
        msg = f"`downsample` must be a positive integer, got {downsample!r}."
        raise ValueError(msg)
    if tile_size < 4 * downsample or overlap < 0:
        msg = f"Need `tile_size` >= {4 * downsample} and `overlap` >= 0, got tile_size={tile_size}, overlap={overlap}."
        raise ValueError(msg)
    if not 0 <= min_area_um2 < max_area_um2 or not math.isfinite(max_area_um2):
        msg = f"Need 0 <= `min_area_um2` < `max_area_um2` < inf, got {min_area_um2} and {max_area_um2}."
        raise ValueError(msg)
    from bitro._checks import check_number

    for name, value in (("sigma_um", sigma_um), ("blob_sigma_um", blob_sigma_um), ("min_distance_um", min_distance_um)):
        check_number(name, value, low=0, low_open=True, hint="It is a length in micrometres.")
    if threshold is not None:
        check_number("threshold", threshold, hint="Leave it out to fit it per section (Otsu).")
    sections = get_sections(data, image_key=image_key)
    _target_key(key_added, sections)
    for section in sections:
        check_rgb_image(scale0(data.images[section.image_key]), section.image_key, "segmentation")
    for section in sections:
        diameter_px = 2 * math.sqrt(max_area_um2 / math.pi) / section.pixel_size
        if overlap < 2 * diameter_px:
            msg = (
                f"`overlap={overlap}` px is less than twice the largest nucleus diameter ({diameter_px:.1f} px at "
                f"{section.pixel_size:.3g} um/px for `max_area_um2={max_area_um2}`) in section {section.sample!r}: "
                f"nuclei on tile seams could be cut. Use `overlap >= {math.ceil(2 * diameter_px)}` or a smaller "
                "`max_area_um2`."
            )
            raise ValueError(msg)

    for section in sections:
        _segment_section(
            data,
            section,
            method=method,
            key=key_added or section.cells_key,
            downsample=int(downsample),
            tile_size=tile_size,
            overlap=overlap,
            area_um2=(min_area_um2, max_area_um2),
            threshold=threshold,
            sigma_um=sigma_um,
            blob_sigma_um=blob_sigma_um,
            min_distance_um=min_distance_um,
            client=client,
            n_jobs=n_jobs,
        )


def _segment_section(
    sdata: SpatialData,
    section: Section,
    *,
    method: str | Callable,
    key: str,
    downsample: int,
    tile_size: int,
    overlap: int,
    area_um2: tuple[float, float],
    threshold: float | None,
    sigma_um: float,
    blob_sigma_um: float,
    min_distance_um: float,
    client: Client | None,
    n_jobs: int | None,
) -> None:
    image = scale0(sdata.images[section.image_key])
    overview, step = _overview(image)
    tissue, otsu = _tissue_and_threshold(overview)
    threshold = otsu if threshold is None else float(threshold)
    level_px = section.pixel_size * downsample
    if method == "watershed":
        name = "watershed"
        func = functools.partial(
            watershed_nuclei,
            threshold=threshold,
            sigma_px=sigma_um / level_px,
            blob_sigma_px=blob_sigma_um / level_px,
            min_distance_px=max(round(min_distance_um / level_px), 1),
            max_hole_px=round(area_um2[0] / level_px**2),
        )
    else:
        name = getattr(method, "__qualname__", type(method).__name__)
        func = method
    tiles = tile_grid(image.sizes["y"], image.sizes["x"], tile_size=tile_size, overlap=overlap)
    if otsu is None:
        logger.warning(
            "No tissue found in image %r (no pixel of mean optical density above %s): section %r gets no cells "
            "and no shapes element.",
            section.image_key,
            TISSUE_OD,
            section.sample,
        )
        todo = []
    else:
        todo = _tiles_with_tissue(tiles, tissue, step)
    logger.info("Segmenting %d of %d tiles of section %r with %s.", len(todo), len(tiles), section.sample, name)
    work = functools.partial(
        _segment_tile,
        method=func,
        name=name,
        downsample=downsample,
        min_area_px=area_um2[0] / section.pixel_size**2,
        max_area_px=area_um2[1] / section.pixel_size**2,
    )
    results = map_tasks(work, TileReads(image, todo), client=client, n_jobs=n_jobs, desc=f"segment {section.sample}")
    polygons = np.concatenate([p for p, _ in results]) if results else np.zeros(0, dtype=object)
    areas = np.concatenate([a for _, a in results]) if results else np.zeros(0)
    if len(polygons):
        columns = {Key.AREA_UM2: areas * section.pixel_size**2}
        sdata.shapes[key] = cells_element(polygons, section, sdata, columns=columns)
    else:  # spatialdata has no empty shapes elements: write none (and drop a stale one)
        if otsu is not None:
            logger.warning("No nuclei found in section %r; no shapes element is written.", section.sample)
        if key in sdata.shapes:
            del sdata.shapes[key]
    record_segmentation(
        sdata,
        section,
        key,
        written=bool(len(polygons)),
        method=name,
        n_cells=len(polygons),
        threshold=threshold,
        downsample=downsample,
        tile_size=tile_size,
        overlap=overlap,
        min_area_um2=area_um2[0],
        max_area_um2=area_um2[1],
        sigma_um=sigma_um,
        blob_sigma_um=blob_sigma_um,
        min_distance_um=min_distance_um,
    )
    logger.info("Found %d nuclei in section %r -> shapes[%r].", len(polygons), section.sample, key)


_FORMATS = ("geojson", "hovernet", "cellvit", "shapes")


def _read_hovernet(path) -> list:
    import json

    from shapely import Polygon

    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("nuc"), dict):
        msg = (
            f"{str(path)!r} is not a HoVer-Net JSON file: expected an object with a 'nuc' mapping of "
            "nucleus id -> {'contour': [[x, y], ...]}."
        )
        raise ValueError(msg)
    polygons = []
    for nucleus_id, nucleus in data["nuc"].items():
        contour = np.asarray(nucleus.get("contour", []) if isinstance(nucleus, dict) else [], dtype=float)
        if contour.ndim != 2 or contour.shape[0] < 3 or contour.shape[1] != 2:
            msg = f"Nucleus {nucleus_id!r} in {str(path)!r} has no valid 'contour' (a list of >= 3 [x, y] points)."
            raise ValueError(msg)
        polygons.append(Polygon(contour))
    return polygons


def _shapes_in_pixels(sdata: SpatialData, key: str, section: Section) -> gpd.GeoDataFrame:
    """Shapes element ``key`` with geometries in the section's pixel coordinate system (circles as polygons)."""
    from spatialdata import transform
    from spatialdata.transformations import get_transformation

    from bitro._utils import check_key

    check_key(sdata.shapes, key, "Shapes element")
    systems = list(get_transformation(sdata.shapes[key], get_all=True))
    if section.coordinate_system not in systems:
        msg = (
            f"Shapes {key!r} are in the coordinate systems {systems}, but image {section.image_key!r} of section "
            f"{section.sample!r} is in {section.coordinate_system!r}. Give the shapes a transformation to "
            f"{section.coordinate_system!r} (spatialdata.transformations.set_transformation) first."
        )
        raise ValueError(msg)
    gdf = transform(sdata.shapes[key], to_coordinate_system=section.coordinate_system)
    if "radius" in gdf.columns and (gdf.geometry.geom_type == "Point").all():
        gdf = gdf.set_geometry(gdf.geometry.buffer(gdf["radius"].to_numpy()))
    return gdf


@renamed_args(sdata="data")
def load_segmentation(
    data: SpatialData,
    source: str | os.PathLike,
    *,
    format: Literal["geojson", "hovernet", "cellvit", "shapes"] = "geojson",
    image_key: str | None = None,
    key_added: str | None = None,
) -> None:
    """Use an existing nucleus segmentation as the cells of a section.

    Polygons from files must be in full-resolution pixels of the section's image (``x`` = column,
    ``y`` = row), as HoVer-Net, CellViT and QuPath export them.

    Parameters
    ----------
    data
        The SpatialData object; a shapes element is added (replacing one of the same name).
    source
        A file (``"geojson"``, ``"hovernet"``, ``"cellvit"``) or the name of a shapes element of
        ``data`` (``"shapes"``).
    format
        ``"geojson"``: a GeoJSON FeatureCollection of polygons (QuPath export; read with geopandas).
        ``"hovernet"``: HoVer-Net JSON, ``{"nuc": {id: {"contour": [[x, y], ...]}}}``.
        ``"cellvit"``: a GeoParquet file with a geometry column (HEST / CellViT segmentations).
        ``"shapes"``: polygons, or circles, already in ``data`` in any coordinate system related to
        the section's; they are transformed to the section's pixels and keep their index.
    image_key
        The section's image; needed when ``data`` has more than one section.
    key_added
        Name of the shapes element; by default ``"{sample}_cells"``.

    Returns
    -------
    Nothing; adds to ``data``:

    - ``shapes["{sample}_cells"]`` (or ``key_added``): the polygons in the section's pixels with the
      image's transformations, indexed by cell id (``"{sample}_{i}"`` for files), column ``"area_um2"``;
    - ``attrs["bitro"]["segmentation"]["{sample}_cells"]`` (or ``key_added``): the section, format and source.

    Examples
    --------
    >>> import bitro as bt
    >>> bt.pp.load_segmentation(sdata, "C2_nuclei.geojson", format="geojson")  # doctest: +SKIP
    """
    from pathlib import Path

    import geopandas as gpd

    from bitro.io import get_sections

    if format not in _FORMATS:
        msg = f"Unknown segmentation `format={format!r}`; choose one of {list(_FORMATS)}."
        raise ValueError(msg)
    sections = get_sections(data, image_key=image_key)
    if len(sections) > 1:
        msg = f"`data` has {len(sections)} sections ({[s.sample for s in sections]}); pass `image_key=` to pick one."
        raise ValueError(msg)
    section = sections[0]
    index = None
    if format == "shapes":
        gdf = _shapes_in_pixels(data, str(source), section)
        polygons, index = list(gdf.geometry), gdf.index.astype(str)
    else:
        path = Path(source)
        if not path.is_file():
            msg = f"Segmentation file {str(path)!r} not found (format={format!r})."
            raise FileNotFoundError(msg)
        if format == "hovernet":
            polygons = _read_hovernet(path)
        else:
            gdf = gpd.read_file(path) if format == "geojson" else gpd.read_parquet(path)
            polygons = list(gdf.geometry)
    if not len(polygons):
        msg = f"No nuclei in {str(source)!r}: it holds no geometries."
        raise ValueError(msg)
    geometry = gpd.GeoSeries(polygons, dtype="geometry")
    bad = ~geometry.geom_type.isin(["Polygon", "MultiPolygon"]).to_numpy()
    if bad.any():
        msg = (
            f"{bad.sum()} of {len(geometry)} geometries in {str(source)!r} are not polygons "
            f"(types found: {sorted(set(geometry.geom_type.astype(str)))}); nuclei must be Polygon or MultiPolygon."
        )
        raise ValueError(msg)
    key = key_added or section.cells_key
    data.shapes[key] = cells_element(
        polygons,
        section,
        data,
        columns={Key.AREA_UM2: geometry.area.to_numpy() * section.pixel_size**2},
        index=index,
    )
    record_segmentation(data, section, key, method=format, source=str(source), n_cells=len(polygons))
    logger.info("Loaded %d nuclei for section %r -> shapes[%r].", len(polygons), section.sample, key)
