"""The cell kNN graph, built by squidpy within each sample."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bitro._constants import Key
from bitro._deprecate import renamed_args
from bitro._logging import logger
from bitro._utils import check_key

if TYPE_CHECKING:
    from anndata import AnnData


@renamed_args(cells="data")
def spatial_graph(
    data: AnnData,
    *,
    n_neighs: int = 8,
    library_key: str = Key.SAMPLE,
    spatial_key: str = Key.SPATIAL,
    key_added: str = Key.GRAPH,
) -> None:
    """Connect each cell to its ``n_neighs`` nearest cells of the same sample.

    A thin wrapper of :func:`squidpy.gr.spatial_neighbors_knn` with ``library_key`` set, so no
    edge joins two sections, and a check that every sample has enough cells.

    Parameters
    ----------
    data
        The cell table from :func:`bitro.pp.extract_cells`.
    n_neighs
        Neighbours per cell.
    library_key
        Column of ``.obs`` naming the sample of each cell (made categorical if it is not).
    spatial_key
        Coordinates in ``.obsm`` (section pixels).
    key_added
        Prefix of the keys squidpy writes.

    Returns
    -------
    Nothing; sets ``data.obsp["{key_added}_connectivities"]``, ``data.obsp["{key_added}_distances"]``
    and ``data.uns["{key_added}_neighbors"]`` as squidpy writes them, and records the parameters in
    ``data.uns["bitro"]["spatial_graph"]`` (``"spatial_graph_{key_added}"`` for another ``key_added``).

    Examples
    --------
    >>> bt.pp.spatial_graph(cells, n_neighs=8)  # doctest: +SKIP
    >>> cells.obsp["spatial_connectivities"]  # doctest: +SKIP
    """
    from bitro._checks import check_anndata, check_finite_array, check_int, check_unique_index
    from bitro.pp._squidpy import import_squidpy

    sq = import_squidpy()

    check_anndata(data, "`data`", "pass the cell table from `bt.pp.extract_cells` (e.g. `sdata['cells']`)")
    check_key(data.obs, library_key, "`.obs` column")
    check_key(data.obsm, spatial_key, "`.obsm` key")
    check_int("n_neighs", n_neighs, minimum=1)
    check_unique_index(data.obs_names, "The cell table (.obs_names)", "give every cell its own id")
    check_finite_array(
        data.obsm[spatial_key], f"The cell centroids .obsm[{spatial_key!r}]", "drop those cells or segment again"
    )
    counts = data.obs[library_key].astype(str).value_counts()
    small = counts[(counts > 0) & (counts <= n_neighs)]
    if len(small):
        msg = (
            f"Samples {dict(small)} have no more than n_neighs={n_neighs} cells, too few for a {n_neighs}-NN graph. "
            "Lower `n_neighs` or drop those samples."
        )
        raise ValueError(msg)
    params = {"n_neighs": int(n_neighs), "library_key": library_key, "spatial_key": spatial_key, "key_added": key_added}
    if data.n_obs == 0:
        from scipy import sparse

        warnings.warn("The cell table is empty: the graph has no edges.", UserWarning, stacklevel=2)
        data.obsp[f"{key_added}_connectivities"] = sparse.csr_matrix((0, 0), dtype=np.float32)
        data.obsp[f"{key_added}_distances"] = sparse.csr_matrix((0, 0), dtype=np.float64)
        data.uns[f"{key_added}_neighbors"] = {
            "connectivities_key": f"{key_added}_connectivities",
            "distances_key": f"{key_added}_distances",
            "params": params,
        }
    else:
        if not isinstance(data.obs[library_key].dtype, pd.CategoricalDtype):  # squidpy needs a categorical
            logger.info("Converting `.obs[%r]` to categorical for squidpy.", library_key)
            data.obs[library_key] = data.obs[library_key].astype("category")
        sq.gr.spatial_neighbors_knn(
            data, spatial_key=spatial_key, library_key=library_key, n_neighs=int(n_neighs), key_added=key_added
        )
    data.uns.setdefault(Key.UNS, {})[Key.keyed(Key.SPATIAL_GRAPH, key_added, Key.GRAPH)] = params
