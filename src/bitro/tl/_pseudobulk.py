"""Pseudo-bulk samples from spot data: :func:`pseudobulk`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from bitro._constants import Key
from bitro._deprecate import renamed_args
from bitro._logging import logger
from bitro._utils import check_key, get_table
from bitro.tl._targets import check_counts, dense

if TYPE_CHECKING:
    from spatialdata import SpatialData

METHODS: tuple[str, ...] = ("grid", "kmeans")
#: ``.obs["block"]`` of the row that sums a whole section.
SECTION_BLOCK = "section"


def _blocks(obs: pd.DataFrame, xy: np.ndarray | None, *, method: str, block_size: int, seed: int) -> np.ndarray:
    """Block label of each spot of one section."""
    if method == "grid":
        r = obs[Key.ARRAY_ROW].to_numpy(int) // block_size
        c = obs[Key.ARRAY_COL].to_numpy(int) // block_size
        return np.array([f"r{i}c{j}" for i, j in zip(r, c, strict=True)], dtype=object)
    from sklearn.cluster import KMeans

    n = max(1, round(len(obs) / block_size**2))
    labels = KMeans(n, n_init=3, random_state=seed).fit_predict(xy)
    return np.array([f"k{k}" for k in labels], dtype=object)


@renamed_args(spots="data")
def pseudobulk(
    data: AnnData | SpatialData,
    *,
    table_key: str = Key.SPOTS_TABLE,
    block_size: int = 4,
    method: Literal["grid", "kmeans"] = "grid",
    min_spots: int | None = None,
    sections: bool = True,
    seed: int = 0,
) -> AnnData:
    """Pseudo-bulk samples: raw counts summed over blocks of neighbouring spots, and over whole sections.

    Each row is a bulk sample whose bag (in :func:`bitro.tl.fit` / :func:`bitro.tl.transfer` with
    ``target="bulk"``, and :func:`bitro.tl.predict`) is the cells of its spots: a region-level bulk profile
    with known tissue, for bulk experiments on spot data.

    Parameters
    ----------
    data
        Spot table with raw counts in ``.X`` and ``.obs["sample"]``; ``.obs["array_row"]`` / ``.obs["array_col"]``
        for ``method="grid"``, ``.obsm["spatial"]`` for ``method="kmeans"``. Or a SpatialData holding it.
    table_key
        The spot table of a SpatialData.
    block_size
        ``"grid"``: blocks of ``block_size x block_size`` array positions; ``"kmeans"``: spatial K-means within each
        section with about ``block_size**2`` spots per block.
    method
        How spots are grouped into blocks: ``"grid"`` (array coordinates) or ``"kmeans"`` (spot centres).
    min_spots
        Blocks with fewer spots (at tissue edges) are dropped; default: half a full block, ``ceil(block_size**2 / 2)``.
    sections
        Also add one row per section summing all its spots.
    seed
        Random seed of ``"kmeans"``.

    Returns
    -------
    AnnData (blocks, then sections x genes) of summed counts, with ``.obs["sample"]`` (the section),
    ``.obs["block"]`` (``"section"`` for whole-section rows), ``.obs["n_spots"]`` and ``.obs["spot_ids"]`` (the block's
    spot ids joined by ``";"``; empty for whole-section rows, whose bag is every cell of the section); the
    parameters are in ``.uns["bitro"]["pseudobulk"]``. ``data`` is not modified.

    Examples
    --------
    >>> bulk = bt.tl.pseudobulk(sdata["spots"], block_size=4)  # doctest: +SKIP
    >>> model = bt.tl.fit(bulk, target="bulk", cells=sdata["cells"])  # doctest: +SKIP
    """
    spots = get_table(data, table_key, "Spot table")
    if method not in METHODS:
        msg = f"method={method!r} is not supported; use one of {METHODS}."
        raise ValueError(msg)
    if int(block_size) < 1:
        msg = f"block_size must be a positive integer, got {block_size!r}."
        raise ValueError(msg)
    min_spots = int(np.ceil(block_size**2 / 2)) if min_spots is None else int(min_spots)
    if min_spots < 1:
        msg = f"min_spots must be a positive integer, got {min_spots!r}."
        raise ValueError(msg)
    check_key(spots.obs.columns, Key.SAMPLE, "Spot table column .obs")
    if method == "grid":
        for col in (Key.ARRAY_ROW, Key.ARRAY_COL):
            if col not in spots.obs:
                msg = f"method='grid' needs the spots' array coordinates .obs[{col!r}]; use method='kmeans' (spot centres) instead."
                raise KeyError(msg)
    else:
        check_key(spots.obsm, Key.SPATIAL, "Spot centres .obsm")
    ids = (spots.obs[Key.SPOT_ID] if Key.SPOT_ID in spots.obs else spots.obs_names.to_series()).astype(str).to_numpy()
    bad = [i for i in ids if Key.SPOT_IDS_SEP in i]
    if bad:
        msg = f"Spot ids must not contain {Key.SPOT_IDS_SEP!r} (it separates the ids of a block), e.g. {bad[:3]}; rename them."
        raise ValueError(msg)
    samples = spots.obs[Key.SAMPLE].astype(str).to_numpy()
    dup = pd.Series(ids).groupby(samples).apply(lambda s: s.duplicated().any())
    if dup.any():
        msg = f"Spot ids are not unique within samples {list(dup.index[dup])}; each spot needs its own id."
        raise ValueError(msg)
    counts = spots.X
    check_counts(dense(counts), "The spot expression (.X)")

    labels, rows = [], []
    xy = np.asarray(spots.obsm[Key.SPATIAL], dtype=np.float64)[:, :2] if Key.SPATIAL in spots.obsm else None
    for sample in pd.unique(samples):
        idx = np.flatnonzero(samples == sample)
        block = _blocks(
            spots.obs.iloc[idx], None if xy is None else xy[idx], method=method, block_size=block_size, seed=seed
        )
        groups = pd.Series(idx).groupby(block).agg(list)
        for name in sorted(groups.index, key=lambda b: (len(b), b)):
            members = np.asarray(groups[name])
            if len(members) >= min_spots:
                rows.append(members)
                labels.append((sample, name, Key.SPOT_IDS_SEP.join(ids[members])))
        if sections:
            rows.append(idx)
            labels.append((sample, SECTION_BLOCK, ""))
    if not rows:
        msg = f"No block has at least min_spots={min_spots} spots; lower `min_spots` or `block_size`."
        raise ValueError(msg)
    member = sp.csr_matrix(
        (
            np.ones(sum(len(r) for r in rows)),
            (np.repeat(np.arange(len(rows)), [len(r) for r in rows]), np.concatenate(rows)),
        ),
        shape=(len(rows), spots.n_obs),
    )
    x = member @ (counts if sp.issparse(counts) else np.asarray(counts, dtype=np.float64))
    x = sp.csr_matrix(x, dtype=np.float32) if sp.issparse(counts) else np.asarray(x, dtype=np.float32)
    obs = pd.DataFrame(labels, columns=[Key.SAMPLE, Key.BLOCK, Key.SPOT_IDS])
    obs.insert(2, Key.N_SPOTS, [len(r) for r in rows])
    obs.index = [s if b == SECTION_BLOCK else f"{s}_{b}" for s, b, _ in labels]
    obs[Key.SAMPLE] = pd.Categorical(obs[Key.SAMPLE])
    out = AnnData(x, obs=obs, var=spots.var.copy())
    params = {
        "block_size": int(block_size),
        "method": method,
        "min_spots": min_spots,
        "sections": sections,
        "seed": seed,
    }
    out.uns[Key.UNS] = {Key.PSEUDOBULK: params}
    n_blocks = int((obs[Key.BLOCK] != SECTION_BLOCK).sum())
    logger.info(f"Pseudo-bulk: {n_blocks} blocks and {out.n_obs - n_blocks} whole sections from {spots.n_obs} spots.")
    return out
