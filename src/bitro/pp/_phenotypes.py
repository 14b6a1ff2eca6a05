"""Cell phenotypes: K-means on the reduced cell features, reusable on new slides."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bitro._constants import Key
from bitro._deprecate import renamed_args
from bitro._features import record_of, reducer_digest
from bitro._logging import logger

if TYPE_CHECKING:
    from anndata import AnnData


def _reference_centroids(reference: Any, key_added: str = Key.PHENOTYPE) -> tuple[np.ndarray, dict[str, Any]]:
    """Centroids of a reference (trained model, cell table or array) and the extraction record they belong to.

    From a cell table: the record of its phenotypes ``key_added``, else of its default phenotypes.
    """
    from anndata import AnnData

    if hasattr(reference, "cell_reference"):  # a trained model (bt.tl.fit / bt.tl.load_model)
        record = reference.cell_reference.get(Key.PHENOTYPES)
        if record is None or "centroids" not in record:
            msg = (
                "The model carries no phenotype centroids (its training cells had no `bt.pp.phenotypes`); pass the "
                "training cell table as `reference=`, or cluster these cells on their own with `n_clusters=`."
            )
            raise ValueError(msg)
        return np.asarray(record["centroids"], dtype=np.float64), reference.cell_reference.get(Key.EXTRACT_CELLS) or {}
    if isinstance(reference, AnnData):
        records = reference.uns.get(Key.UNS, {})
        name = Key.keyed(Key.PHENOTYPES, key_added, Key.PHENOTYPE)
        record = records.get(name, records.get(Key.PHENOTYPES))
        if record is None or "centroids" not in record:
            msg = (
                f"The reference AnnData has no `.uns[{Key.UNS!r}][{name!r}]['centroids']`: pass a cell table on "
                "which `bt.pp.phenotypes` was run, or the trained model."
            )
            raise ValueError(msg)
        return np.asarray(record["centroids"], dtype=np.float64), record_of(reference) or {}
    centroids = np.asarray(reference, dtype=np.float64)
    if centroids.ndim != 2 or len(centroids) == 0:
        msg = (
            "`reference` must be a trained model, a cell table or a (n_clusters, n_features) array of centroids, "
            f"got shape {centroids.shape}."
        )
        raise ValueError(msg)
    return centroids, {}


@renamed_args(cells="data", random_state="seed")
def phenotypes(
    data: AnnData,
    *,
    n_clusters: int = 8,
    reference: Any = None,
    use_rep: str = Key.FEATURES,
    key_added: str = Key.PHENOTYPE,
    seed: int = 0,
) -> None:
    """Cluster cells into phenotypes by K-means on their reduced features.

    Parameters
    ----------
    data
        The cell table from :func:`bitro.pp.extract_cells`.
    n_clusters
        Number of phenotypes (ignored with ``reference``).
    reference
        A trained model, or a cell table on which this function ran (or its centroids): new cells are
        assigned to the nearest stored centroid instead of fitting new ones, so phenotype ``k`` means the
        same on every slide. The features must come from the same PCA (``extract_cells(..., reference=...)``).
    use_rep
        Features in ``.obsm`` to cluster.
    key_added
        Column of ``.obs`` for the phenotypes.
    seed
        Seed of K-means.

    Returns
    -------
    Nothing; sets ``data.obs[key_added]`` (categorical ``"0"``, ``"1"``, ...) and
    ``data.uns["bitro"]["phenotypes"]`` (parameters and ``"centroids"``; ``"phenotypes_{key_added}"`` for another
    ``key_added``, so that each clustering keeps its record).

    Examples
    --------
    >>> bt.pp.phenotypes(cells, n_clusters=8)  # doctest: +SKIP
    >>> bt.pp.phenotypes(new_cells, reference=cells)  # doctest: +SKIP
    >>> bt.pp.phenotypes(new_cells, reference=model)  # doctest: +SKIP
    """
    from bitro._checks import check_anndata, check_finite_array, check_int
    from bitro._utils import check_key

    check_anndata(data, "`data`", "pass the cell table from `bt.pp.extract_cells` (e.g. `sdata['cells']`)")
    check_key(data.obsm, use_rep, "`.obsm` key")
    check_int("seed", seed, minimum=0)
    if reference is None:
        check_int("n_clusters", n_clusters, minimum=1)
    x = check_finite_array(
        data.obsm[use_rep], f"The cell features .obsm[{use_rep!r}]", "drop those cells or extract the features again"
    )
    if reference is not None:
        centroids, ref_cells = _reference_centroids(reference, key_added)
        if centroids.shape[1] != x.shape[1]:
            msg = (
                f"The reference centroids have {centroids.shape[1]} features but `.obsm[{use_rep!r}]` has {x.shape[1]}. "
                "Extract the cells with `bt.pp.extract_cells(..., reference=<training cell table>)`."
            )
            raise ValueError(msg)
        own = record_of(data) or {}
        if "reducer" in ref_cells and "reducer" in own:
            if reducer_digest(ref_cells["reducer"]) != reducer_digest(own["reducer"]):
                msg = (
                    "These cells' features come from a different PCA than the reference's, so the centroids do not "
                    "apply. Extract them with `bt.pp.extract_cells(..., reference=model)` (or the training cell table)."
                )
                raise ValueError(msg)
        n_clusters = len(centroids)
    elif not (int(n_clusters) == n_clusters and 1 <= n_clusters and (n_clusters <= len(x) or len(x) == 0)):
        msg = f"`n_clusters` must be an integer from 1 to the number of cells ({len(x)}), got {n_clusters!r}."
        raise ValueError(msg)

    categories = [str(k) for k in range(int(n_clusters))]
    if len(x) == 0:
        warnings.warn("The cell table is empty: no phenotypes assigned.", UserWarning, stacklevel=2)
        labels = np.zeros(0, dtype=int)
        centroids = centroids if reference is not None else np.zeros((0, x.shape[1]))
    elif reference is not None:
        from scipy.spatial import cKDTree

        labels = cKDTree(centroids).query(x, k=1)[1]
    else:
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=int(n_clusters), n_init=10, random_state=seed).fit(x)
        labels, centroids = km.labels_, km.cluster_centers_
    data.obs[key_added] = pd.Categorical.from_codes(labels, categories=categories)
    data.uns.setdefault(Key.UNS, {})[Key.keyed(Key.PHENOTYPES, key_added, Key.PHENOTYPE)] = {
        "n_clusters": int(n_clusters),
        "use_rep": use_rep,
        "key_added": key_added,
        "seed": int(seed),
        "fitted_on": "reference" if reference is not None else "these cells",
        "centroids": np.asarray(centroids, dtype=np.float64),
    }
    logger.info("Phenotypes %r: %d clusters over %d cells.", key_added, int(n_clusters), len(x))
