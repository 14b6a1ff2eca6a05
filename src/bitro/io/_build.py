"""Build the elements of a bitro section: the one place that knows how a section is laid out.

Used by every reader (:func:`bitro.io.read_st`, :func:`bitro.io.read_wsi`) and by
:func:`bitro.datasets.synthetic`, so that all of them produce the layout documented in
:mod:`bitro._constants`.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def section_transformations(sample: str, pixel_size: float) -> dict[str, Any]:
    """Transformations of a section's full-resolution elements: pixels (Identity) and micrometres (Scale)."""
    from spatialdata.transformations import Identity, Scale

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
        transformations=section_transformations(sample, pixel_size),
        scale_factors=factors or None,
        chunks=(3, IMAGE_CHUNK, IMAGE_CHUNK),
    )


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


def spots_table(adatas: Sequence[AnnData]) -> AnnData:
    """Concatenate per-section spot AnnDatas into the ``"spots"`` table annotating every ``"{s}_spots"``.

    Each input needs ``.obs["sample"]`` and ``.obsm["spatial"]``; its ``obs_names`` are the spot ids
    of ``"{sample}_spots"``.
    """
    import anndata as ad
    from spatialdata.models import TableModel

    tables = []
    for a in adatas:
        a = a.copy()
        sample = str(a.obs[Key.SAMPLE].iloc[0])
        a.obs[Key.REGION] = Key.spots(sample)
        a.obs[Key.SPOT_ID] = a.obs_names.astype(str)
        tables.append(a)
    table = ad.concat(tables, join="outer", fill_value=0, merge="same", uns_merge="first")
    table.obs_names = [f"{s}_{i}" for s, i in zip(table.obs[Key.SAMPLE], table.obs[Key.SPOT_ID], strict=True)]
    table.obs[Key.SAMPLE] = pd.Categorical(table.obs[Key.SAMPLE])
    table.obs[Key.REGION] = pd.Categorical(table.obs[Key.REGION])
    return TableModel.parse(
        table, region=list(table.obs[Key.REGION].cat.categories), region_key=Key.REGION, instance_key=Key.SPOT_ID
    )


def section_sdata(sample: str, image: xr.DataTree, spots=None, table: AnnData | None = None) -> SpatialData:
    """A SpatialData holding one section's image, spots and spot table."""
    from spatialdata import SpatialData

    return SpatialData(
        images={Key.image(sample): image},
        shapes={Key.spots(sample): spots} if spots is not None else {},
        tables={Key.SPOTS_TABLE: table} if table is not None else {},
    )
