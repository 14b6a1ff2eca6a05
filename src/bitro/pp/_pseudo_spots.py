"""Pseudo-spots: cell-resolved expression (Xenium, Visium HD, CosMx) summed into spot-like bags for training."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from bitro._constants import Key
from bitro._deprecate import renamed_args
from bitro._logging import logger
from bitro.pp._lattice import LAYOUTS, spot_lattice

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

@renamed_args(sdata="data")
def pseudo_spots(
    data: SpatialData,
    *,
    table_key: str = "table",
    diameter_um: float = 55.0,
    pitch_um: float = 100.0,
    layout: Literal["hex", "grid"] = "hex",
    key_added: str = Key.SPOTS_TABLE,
) -> AnnData:
    """Sum cell-resolved counts into pseudo-spots, so bitro trains at spot level on Xenium / Visium HD / CosMx data.

    The protocol of the BiTro paper's and iStar's cellular experiments: spot-like circles of ``diameter_um`` are
    laid on a lattice of ``pitch_um`` over each section's cells, a spot's counts are the sum over the cells whose
    centroid lies inside it, and the model trained on these spots is scored on the true cells
    (:func:`bitro.tl.evaluate_cells`). The circles and table are written in bitro's layout (shapes
    ``"{sample}_spots"``, table ``key_added``), so :func:`bitro.pp.extract_cells` assigns the cells to them and
    :func:`bitro.tl.fit` trains on them unchanged.

    Parameters
    ----------
    data
        A SpatialData with an H&E image per section and a table of per-cell counts ``table_key`` annotating the cell
        shapes (polygons or circles) in the image's coordinate system, as spatialdata-io lays out Xenium
        (``"table"`` annotating ``"cell_circles"`` / ``"cell_boundaries"``) and Visium HD.
    table_key
        The per-cell counts table (cells x genes, raw counts in ``.X``).
    diameter_um
        Pseudo-spot diameter in micrometres (55 as Visium; larger than a cell).
    pitch_um
        Distance between neighbouring spot centres, at least ``diameter_um`` (spots do not overlap).
    layout
        ``"hex"`` (Visium-like) or ``"grid"`` (square).
    key_added
        Name of the pseudo-spot table.

    Returns
    -------
    The pseudo-spot table: spots x the genes of ``table_key`` (summed raw counts), ``.obs["sample"]``,
    ``"spot_id"``, ``"array_row"``, ``"array_col"``, ``"n_cells"``; ``.obsm["spatial"]`` centres in section pixels;
    annotating the circles ``"{sample}_spots"`` (also written to ``data``). Spots without a cell are left out.

    Examples
    --------
    >>> spots = bt.pp.pseudo_spots(xenium_sdata, diameter_um=55, pitch_um=100)  # doctest: +SKIP
    >>> bt.pp.segment_nuclei(xenium_sdata)  # doctest: +SKIP
    >>> cells = bt.pp.extract_cells(xenium_sdata)  # cells -> pseudo-spots by centroid  # doctest: +SKIP
    """
    import anndata as ad
    import scipy.sparse as sp
    import shapely
    from scipy.spatial import cKDTree
    from spatialdata.models import TableModel

    from bitro.io import get_sections
    from bitro.io._build import spots_element, spots_table
    from bitro.pp._cells import _affine, _polygons

    checks = [
        (
            isinstance(diameter_um, int | float) and math.isfinite(diameter_um) and diameter_um > 0,
            "`diameter_um` must be a positive number of micrometres",
        ),
        (
            isinstance(pitch_um, int | float) and math.isfinite(pitch_um) and pitch_um >= diameter_um,
            "`pitch_um` must be at least `diameter_um` (pseudo-spots do not overlap)",
        ),
        (layout in LAYOUTS, f"`layout` must be one of {LAYOUTS}"),
    ]
    for ok, what in checks:
        if not ok:
            msg = f"{what}; got diameter_um={diameter_um!r}, pitch_um={pitch_um!r}, layout={layout!r}."
            raise ValueError(msg)
    if table_key not in data.tables:
        msg = f"No table {table_key!r} of per-cell counts in the SpatialData (tables: {sorted(data.tables)})."
        raise KeyError(msg)
    table = data.tables[table_key]
    attrs = table.uns.get(TableModel.ATTRS_KEY) or {}
    region_key, instance_key = attrs.get("region_key"), attrs.get("instance_key")
    if region_key not in table.obs or instance_key not in table.obs:
        msg = (
            f"Table {table_key!r} does not annotate cell shapes (no region / instance key in its spatialdata attrs): "
            "bitro needs each cell's boundary or centroid. Parse it with `spatialdata.models.TableModel.parse(..., "
            "region=<cell shapes>, region_key=..., instance_key=...)`."
        )
        raise ValueError(msg)
    sections = get_sections(data)
    parts, written = [], {}
    for region in pd.unique(table.obs[region_key].astype(str)):
        if region not in data.shapes:
            msg = f"Table {table_key!r} annotates {region!r}, which is not a shapes element of the SpatialData."
            raise KeyError(msg)
        gdf = data.shapes[region]
        from spatialdata.transformations import get_transformation

        systems = set(get_transformation(gdf, get_all=True))
        section = next((s for s in sections if s.coordinate_system in systems), None)
        if section is None:
            msg = (
                f"The cell shapes {region!r} share no coordinate system with an H&E image ({[s.coordinate_system for s in sections]}); "
                "register the image and the cells to one coordinate system first."
            )
            raise ValueError(msg)
        rows = np.flatnonzero(table.obs[region_key].astype(str).to_numpy() == region)
        ids = table.obs[instance_key].to_numpy()[rows]
        polygons = _polygons(gdf, _affine(gdf, section.coordinate_system, f"Cell shapes {region!r}"))
        index = pd.Index(gdf.index)
        where = index.get_indexer(ids)
        if (where < 0).any():
            msg = f"{int((where < 0).sum())} cells of table {table_key!r} have no shape in {region!r} (e.g. {ids[where < 0][:3].tolist()})."
            raise KeyError(msg)
        xy = shapely.get_coordinates(shapely.centroid(polygons[where]))
        ps = section.pixel_size
        cell_diameter = 2 * math.sqrt(float(np.median(shapely.area(polygons[where]))) / math.pi) * ps
        if diameter_um < cell_diameter:
            msg = (
                f"Pseudo-spots of {diameter_um} um are smaller than a typical cell of {region!r} ({cell_diameter:.1f} um "
                "across): a spot must hold several cells. Use a larger `diameter_um`."
            )
            raise ValueError(msg)
        centres, arr_row, arr_col = spot_lattice(xy * ps, pitch_um, layout)
        dist, nearest = cKDTree(centres).query(xy * ps, distance_upper_bound=diameter_um / 2)
        inside = np.isfinite(dist)
        used, spot_of = np.unique(nearest[inside], return_inverse=True)
        member = sp.csr_matrix(
            (np.ones(int(inside.sum())), (spot_of, np.flatnonzero(inside))), shape=(len(used), len(rows))
        )
        counts = member @ sp.csr_matrix(table.X[rows])
        spot_ids = [f"{arr_col[u]}x{arr_row[u]}" for u in used]
        obs = pd.DataFrame(
            {
                Key.SAMPLE: section.sample,
                Key.ARRAY_ROW: arr_row[used],
                Key.ARRAY_COL: arr_col[used],
                Key.N_CELLS: np.asarray(member.sum(axis=1)).ravel().astype(int),
            },
            index=pd.Index(spot_ids),
        )
        a = ad.AnnData(sp.csr_matrix(counts, dtype=np.float32), obs=obs, var=pd.DataFrame(index=table.var_names))
        a.obsm[Key.SPATIAL] = centres[used] / ps
        parts.append(a)
        written[Key.spots(section.sample)] = spots_element(
            centres[used] / ps, diameter_um / 2 / ps, spot_ids, section.coordinate_system, ps
        )
        logger.info(
            "Section %r: %d pseudo-spots of %g um hold %d of %d cells.",
            section.sample,
            len(used),
            diameter_um,
            int(inside.sum()),
            len(rows),
        )
    spots = spots_table(parts)
    spots.uns[Key.UNS] = {
        Key.PSEUDO_SPOTS: {
            "diameter_um": float(diameter_um),
            "pitch_um": float(pitch_um),
            "layout": layout,
            "table_key": table_key,
        }
    }
    for name, element in written.items():
        data.shapes[name] = element
    data.tables[key_added] = spots
    return spots
