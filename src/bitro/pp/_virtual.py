"""Virtual spots: circles laid over the tissue of a slide, so that a spot model can predict every cell."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bitro._constants import Key
from bitro._logging import logger
from bitro.pp._lattice import covering_lattice

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def virtual_spots(
    data: AnnData | SpatialData,
    *,
    diameter_um: float,
    cells_key: str = Key.CELLS_TABLE,
    key_added: str | None = None,
) -> AnnData:
    """Lay virtual spots over the tissue: circles on a hexagonal lattice that cover every cell.

    The tissue is where the cell table has cells. Circles of ``diameter_um`` are laid on a hexagonal
    lattice (spacing ``diameter_um / 2 * sqrt(3)``), dense enough that every cell lies in at least one
    circle (most in one, some in two or three); circles with no cell are dropped. :func:`bitro.tl.predict`
    lays them with the spot size a model was trained on, so a spot model predicts slides without spots.

    Parameters
    ----------
    data
        The cell table (``.obs["sample"]``, ``.obsm["spatial"]`` in section pixels, ``.uns["bitro"]["pixel_size"]``),
        or a SpatialData holding it.
    diameter_um
        Spot diameter in micrometres (55 for Visium, 100 for legacy ST).
    cells_key
        The cell table of a SpatialData.
    key_added
        With a SpatialData: also write the table as ``sdata.tables[key_added]``. The circles are always added
        to a SpatialData, as shapes ``"{sample}_virtual_spots"`` (replacing earlier ones).

    Returns
    -------
    The virtual spot table: one row per spot, no genes; ``.obs["sample"]``, ``.obs["spot_id"]``,
    ``.obs["region"]`` (``"{sample}_virtual_spots"``), ``.obs["n_cells"]`` (cells inside), ``.obsm["spatial"]``
    (centres in section pixels), ``.uns["bitro"]["virtual_spots"]`` (diameter, pixel sizes).

    Examples
    --------
    >>> spots = bt.pp.virtual_spots(sdata, diameter_um=100, key_added="virtual_spots")  # doctest: +SKIP
    """
    from anndata import AnnData
    from scipy.spatial import cKDTree

    from bitro.io._build import spots_element, virtual_spots_table

    if not (isinstance(diameter_um, int | float) and math.isfinite(diameter_um) and diameter_um > 0):
        msg = f"`diameter_um` must be a positive number of micrometres, got {diameter_um!r}."
        raise ValueError(msg)
    sdata = None
    if not isinstance(data, AnnData):
        from spatialdata import SpatialData

        if not isinstance(data, SpatialData):
            msg = f"`data` must be a cell table (AnnData) or a SpatialData, got {type(data).__name__}."
            raise TypeError(msg)
        if cells_key not in data.tables:
            msg = f"No cell table {cells_key!r} in the SpatialData (tables: {sorted(data.tables)}); run `bt.pp.extract_cells`."
            raise KeyError(msg)
        sdata, data = data, data.tables[cells_key]
    elif key_added is not None:
        msg = "`key_added` writes shapes and a table into a SpatialData; `data` is an AnnData. Pass the SpatialData."
        raise ValueError(msg)
    sizes = data.uns.get(Key.UNS, {}).get(Key.PIXEL_SIZE, {})
    samples = data.obs[Key.SAMPLE].astype(str).to_numpy()
    lacking = sorted(set(samples) - set(map(str, sizes)))
    if lacking:
        msg = f"The cell table has no pixel size for samples {lacking} (`.uns['bitro']['pixel_size']`); build it with `bt.pp.extract_cells`."
        raise KeyError(msg)
    sections = {}  # the pixel coordinate system of each section (named after the sample when there is no image)
    if sdata is not None and sdata.images:
        from bitro.io import get_sections

        sections = {s.sample: s for s in get_sections(sdata)}
    radius = diameter_um / 2
    xy_all = np.asarray(data.obsm[Key.SPATIAL], dtype=np.float64)[:, :2]
    parts, shapes = [], {}
    for sample in pd.unique(samples):
        ps = float(sizes[sample])
        xy_um = xy_all[samples == sample] * ps
        centres = covering_lattice(xy_um, radius)
        n_cells = np.array([len(c) for c in cKDTree(xy_um).query_ball_point(centres, radius)], dtype=int)
        ids = [f"v{k}" for k in range(len(centres))]
        a = AnnData(obs=pd.DataFrame({Key.SAMPLE: sample, Key.N_CELLS: n_cells}, index=pd.Index(ids)))
        a.obsm[Key.SPATIAL] = centres / ps
        parts.append(a)
        if sdata is not None and len(centres):
            cs = sections[sample].coordinate_system if sample in sections else sample
            shapes[Key.virtual_spots(sample)] = spots_element(centres / ps, radius / ps, ids, cs, ps)
        logger.info(
            "Section %r: %d virtual spots of %g um cover %d cells.", sample, len(centres), diameter_um, len(xy_um)
        )
    parts = [p for p in parts if p.n_obs]
    if not parts:
        msg = "The cell table has no cells, so no virtual spot can be laid (no tissue found?)."
        raise ValueError(msg)
    table = virtual_spots_table(parts)
    table.uns[Key.UNS] = {
        Key.VIRTUAL_SPOTS: {"diameter_um": float(diameter_um)},
        Key.PIXEL_SIZE: {str(k): float(v) for k, v in sizes.items()},
    }
    if sdata is not None:
        for name, element in shapes.items():
            sdata.shapes[name] = element
        if key_added is not None:
            sdata.tables[key_added] = table
    return table
