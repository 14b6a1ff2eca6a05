"""Build the elements of a bitro section: the one place that knows how a section is laid out.

Used by every reader (:func:`bitro.io.read_st`, :func:`bitro.io.read_wsi`) and by
:func:`bitro.datasets.synthetic`, so that all of them produce the layout documented in
:mod:`bitro._constants`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bitro._constants import Key

if TYPE_CHECKING:
    import dask.array as da
    import xarray as xr
    from anndata import AnnData
    from spatialdata import SpatialData

#: Chunk edge (pixels) of image elements.
IMAGE_CHUNK = 1024


def section_transformations(sample: str, pixel_size: float, *, image: bool = False) -> dict[str, Any]:
    """Transformations of a section's full-resolution elements: pixels (Identity) and micrometres (Scale).

    For images (``image=True``) the Scale names the channel axis too (factor 1), as the zarr format
    stores it; otherwise an image read back from zarr would not equal the one written.
    """
    from spatialdata.transformations import Identity, Scale

    if image:
        return {sample: Identity(), Key.microns(sample): Scale([1.0, pixel_size, pixel_size], axes=("c", "y", "x"))}
    return {sample: Identity(), Key.microns(sample): Scale([pixel_size, pixel_size], axes=("x", "y"))}


def pyramid_factors(height: int, width: int, *, min_size: int = 1024) -> list[int]:
    """Scale factors (2 each) until the smallest level is below ``min_size`` pixels on its long edge."""
    factors, size = [], max(height, width)
    while size > min_size:
        factors.append(2)
        size //= 2
    return factors


def image_element(
    data: np.ndarray | da.Array, sample: str, pixel_size: float, *, scale_factors: Sequence[int] | None = None
) -> xr.DataTree:
    """A multiscale, chunked RGB image element from a ``(c, y, x)`` uint8 array (numpy or dask)."""
    from spatialdata.models import Image2DModel

    _, h, w = data.shape
    factors = list(scale_factors) if scale_factors is not None else pyramid_factors(h, w)
    return Image2DModel.parse(
        data,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations=section_transformations(sample, pixel_size, image=True),
        scale_factors=factors or None,
        chunks=(3, IMAGE_CHUNK, IMAGE_CHUNK),
    )


def pyramid_image_element(levels: Sequence[da.Array], sample: str, pixel_size: float) -> xr.DataTree:
    """A multiscale RGB image element from ready-made pyramid levels (``(c, y, x)`` uint8 dask arrays, largest first).

    For files that store their own pyramid (whole-slide TIFF/SVS): every stored level becomes a level
    of the element, nothing is resampled. Level ``k`` maps to full-resolution pixels by the ratio of
    the level sizes (which need not be a power of 2).
    """
    from spatialdata.models import Image2DModel
    from spatialdata.models.pyramids_utils import dask_arrays_to_datatree
    from spatialdata.transformations import set_transformation

    # the coordinates (pixel centres in full-resolution units) that spatialdata itself gives read-back images
    from spatialdata.transformations._utils import compute_coordinates

    tree = dask_arrays_to_datatree(list(levels), dims=("c", "y", "x"), channels=["r", "g", "b"])
    set_transformation(tree, section_transformations(sample, pixel_size, image=True), set_all=True)
    tree = compute_coordinates(tree)
    Image2DModel().validate(tree)
    return tree


def spots_element(xy: np.ndarray, radius_px: float | np.ndarray, spot_ids: Sequence[str], sample: str, pixel_size: float):
    """Spot circles (centres in pixels, radius in pixels), indexed by spot id."""
    from spatialdata.models import ShapesModel

    radius = np.broadcast_to(np.asarray(radius_px, dtype=float), (len(xy),)).copy()
    return ShapesModel.parse(
        np.asarray(xy, dtype=float),
        geometry=0,
        radius=radius,
        index=pd.Index(list(spot_ids), name=Key.SPOT_ID),
        transformations=section_transformations(sample, pixel_size),
    )


def polygons_element(
    polygons: Sequence, ids: Sequence[str], sample: str, pixel_size: float, *, index_name: str = Key.CELL_ID
):
    """Polygon shapes (shapely polygons, vertices in pixels), indexed by ``ids``."""
    import geopandas as gpd
    from spatialdata.models import ShapesModel

    gdf = gpd.GeoDataFrame(geometry=list(polygons), index=pd.Index(list(ids), name=index_name))
    return ShapesModel.parse(gdf, transformations=section_transformations(sample, pixel_size))


def _row_names(sample: str, ids: pd.Series) -> list[str]:
    """Table row names unique across sections: ``"{sample}_{id}"``, or the ids themselves when they already say so.

    bitro's segmentation names the cells of section ``B4`` ``"B4_0"``, ``"B4_1"``, ...: their rows keep those
    names (not ``"B4_B4_0"``); spot ids (``"10x13"``) and other ids get the sample in front.
    """
    prefix = f"{sample}_"
    ids = ids.astype(str)
    if len(ids) and bool(ids.str.startswith(prefix).all()):
        return ids.tolist()
    return [prefix + i for i in ids]


def _annotating_table(adatas: Sequence[AnnData], element: Callable[[str], str], instance_key: str) -> AnnData:
    """Concatenate per-section AnnDatas into one table annotating the element ``element(sample)`` of each."""
    import anndata as ad
    from spatialdata.models import TableModel

    tables = []
    for a in adatas:
        a = a.copy()
        sample = str(a.obs[Key.SAMPLE].iloc[0])
        a.obs[Key.REGION] = element(sample)
        a.obs[instance_key] = a.obs_names.astype(str)
        a.obs_names = _row_names(sample, a.obs[instance_key])
        tables.append(a)
    if len({n for t in tables for n in t.obs_names}) < sum(t.n_obs for t in tables):  # kept ids clash across sections
        for t in tables:
            t.obs_names = [f"{t.obs[Key.SAMPLE].iloc[0]}_{i}" for i in t.obs[instance_key]]
    table = ad.concat(tables, join="outer", fill_value=0, merge="same", uns_merge="first")
    table.obs[Key.SAMPLE] = pd.Categorical(table.obs[Key.SAMPLE])
    table.obs[Key.REGION] = pd.Categorical(table.obs[Key.REGION])
    return TableModel.parse(
        table, region=list(table.obs[Key.REGION].cat.categories), region_key=Key.REGION, instance_key=instance_key
    )


def spots_table(adatas: Sequence[AnnData]) -> AnnData:
    """Concatenate per-section spot AnnDatas into the ``"spots"`` table annotating every ``"{s}_spots"``.

    Each input needs ``.obs["sample"]`` and ``.obsm["spatial"]``; its ``obs_names`` are the spot ids
    of ``"{sample}_spots"``.
    """
    return _annotating_table(adatas, Key.spots, Key.SPOT_ID)


def virtual_spots_table(adatas: Sequence[AnnData]) -> AnnData:
    """Concatenate per-section virtual spot AnnDatas into a table annotating every ``"{s}_virtual_spots"``."""
    return _annotating_table(adatas, Key.virtual_spots, Key.SPOT_ID)


def cells_table(adatas: Sequence[AnnData], *, element: Callable[[str], str] = Key.cells) -> AnnData:
    """Concatenate per-section cell AnnDatas into a table annotating every ``element(sample)`` (``"{s}_cells"``).

    Each input needs ``.obs["sample"]`` and ``.obsm["spatial"]``; its ``obs_names`` are the cell ids
    (the index of the cell shapes element).
    """
    return _annotating_table(adatas, element, Key.CELL_ID)


def bulk_table(counts: np.ndarray, samples: Sequence[str], genes: Sequence[str]) -> AnnData:
    """The ``"bulk"`` table: one row of raw counts (sparse CSR, float32) per slide, ``.obs["sample"]`` its id."""
    import anndata as ad
    import scipy.sparse as sp
    from spatialdata.models import TableModel

    obs = pd.DataFrame({Key.SAMPLE: pd.Categorical(list(samples))}, index=pd.Index(list(samples)))
    X = sp.csr_matrix(np.asarray(counts, dtype=np.float32))
    return TableModel.parse(ad.AnnData(X, obs=obs, var=pd.DataFrame(index=pd.Index(list(genes)))))


def section_sdata(sample: str, image: xr.DataTree, spots=None, table: AnnData | None = None) -> SpatialData:
    """A SpatialData holding one section's image, spots and spot table."""
    from spatialdata import SpatialData

    return SpatialData(
        images={Key.image(sample): image},
        shapes={Key.spots(sample): spots} if spots is not None else {},
        tables={Key.SPOTS_TABLE: table} if table is not None else {},
    )
