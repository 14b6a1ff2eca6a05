"""Score predicted cells against true cells: PCC_gene, PCC_overall and the within-spot score, beside an equal split."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bitro._constants import Key
from bitro._deprecate import renamed_args
from bitro._logging import logger
from bitro.tl._metrics import pcc_per_gene, pcc_per_obs

if TYPE_CHECKING:
    from anndata import AnnData


def _spot_means(x: np.ndarray, spot: np.ndarray, n_spots: int) -> np.ndarray:
    sums = np.zeros((n_spots, x.shape[1]))
    np.add.at(sums, spot, x)
    return sums / np.bincount(spot, minlength=n_spots)[:, None]


def _scores(pred: np.ndarray, truth: np.ndarray, spot: np.ndarray, n_spots: int) -> dict[str, float]:
    within = pcc_per_gene(
        pred - _spot_means(pred, spot, n_spots)[spot], truth - _spot_means(truth, spot, n_spots)[spot]
    )
    r_gene = pcc_per_gene(pred, truth)
    return {
        "pcc_gene": float(np.nanmean(r_gene)) if np.isfinite(r_gene).any() else np.nan,
        "pcc_overall": float(np.nanmean(pcc_per_obs(pred, truth))),
        # a prediction constant within every spot (the equal split) has no within-spot correlation: 0, not NaN
        "within_spot": float(np.nan_to_num(within).mean()),
    }


@renamed_args(groupby="library_key")
def evaluate_cells(
    predicted: AnnData,
    observed: AnnData,
    *,
    scale: str | None = None,
    library_key: str | None = Key.SAMPLE,
    spot_key: str = Key.SPOT_ID,
) -> pd.DataFrame:
    """Score predicted cell expression against the cells' true expression, beside the equal split of each spot.

    For cell-resolved data (Xenium, Visium HD, CosMx, synthetic): the model is trained on (pseudo-)spots and its
    cells are scored on the cells' own measured expression, on the genes both tables have, within each group
    (a held-out section):

    - **PCC_gene**: per gene, the Pearson correlation over cells; the mean over genes (genes constant in the
      truth of a group are left out).
    - **PCC_overall**: per cell, the correlation over genes; the mean over cells.
    - **within-spot**: the PCC_gene after subtracting, from prediction and truth alike, the mean of the cells of
      each spot: can the model tell the cells of one spot apart? Scored on the cells that lie in a spot.
    - **equal split**: the trivial reference on the same cells, every cell of a spot given the mean predicted
      value of that spot's cells (the spot's prediction). It only follows the differences between spots; its
      within-spot score is 0 by construction.

    Parameters
    ----------
    predicted
        The cell expression table of :func:`bitro.tl.predict` (cells x genes on the model's scale, ``.obs[spot_key]``
        naming each cell's spot).
    observed
        The cells' measured expression: raw counts (or expected counts) in ``.X``, cells matched to ``predicted``
        by ``obs_names``. Brought to the predictions' scale with the library size over all its genes.
    scale
        ``"cp10k"``, ``"log1p"`` or ``"hist2st"``; by default the scale recorded by :func:`bitro.tl.predict`.
    library_key
        Column of ``predicted.obs`` scored separately (``None``: all cells together).
    spot_key
        Column of ``predicted.obs`` with each cell's spot (missing outside every spot).

    Returns
    -------
    One row per group and method (``"bitro"``, ``"equal split"``): ``n_cells``, ``n_genes``, ``pcc_gene``,
    ``pcc_overall``, ``within_spot`` (scored on ``n_cells_in_spots`` cells).

    Examples
    --------
    >>> expr = bt.tl.predict(model, test_spots, cells=cells, coverage="spots")  # doctest: +SKIP
    >>> bt.tl.evaluate_cells(expr, sdata["table"])  # doctest: +SKIP
    """
    from bitro.tl._evaluate import observed_on_scale, prediction_scale

    scale = prediction_scale(predicted, scale)
    shared = predicted.obs_names.intersection(observed.obs_names)
    if len(shared) == 0:
        msg = (
            "No cell of the predictions is in the observed table (matched by obs_names, e.g. "
            f"{list(predicted.obs_names[:2])} vs {list(observed.obs_names[:2])}); extract the cells from the shapes the "
            "observed table annotates, so both name the cells alike."
        )
        raise KeyError(msg)
    genes = [g for g in predicted.var_names if g in set(observed.var_names)]
    if not genes:
        msg = f"The predictions and the observed table share no gene (e.g. {list(predicted.var_names[:3])} vs {list(observed.var_names[:3])})."
        raise KeyError(msg)
    for column in [c for c in (library_key, spot_key) if c is not None]:
        if column not in predicted.obs:
            msg = f"`.obs[{column!r}]` is not a column of the predictions (columns: {list(predicted.obs.columns)})."
            raise KeyError(msg)
    p_rows, o_rows = predicted.obs_names.get_indexer(shared), observed.obs_names.get_indexer(shared)
    pred = np.asarray(predicted[p_rows][:, genes].X, dtype=np.float64)
    truth = observed_on_scale(observed, o_rows, observed.var_names.get_indexer(genes), scale)
    obs = predicted.obs.iloc[p_rows]
    groups = obs[library_key].astype(str).to_numpy() if library_key is not None else np.full(len(shared), "all")
    spot_col = obs[spot_key]
    in_spot = (spot_col.notna() & (spot_col.astype(str) != "")).to_numpy()
    spot_label = (obs[library_key].astype(str) + "\x00" if library_key is not None else "") + spot_col.astype(str)
    rows = []
    for g in pd.unique(groups):
        m = (groups == g) & in_spot
        spot, spot_ids = pd.factorize(spot_label.to_numpy()[m])
        equal = _spot_means(pred[m], spot, len(spot_ids))[spot]
        for method, values in (("bitro", pred[m]), ("equal split", equal)):
            rows.append(
                {
                    "group": g,
                    "method": method,
                    "n_cells_in_spots": int(m.sum()),
                    "n_genes": len(genes),
                    **_scores(values, truth[m], spot, len(spot_ids)),
                }
            )
        everywhere = groups == g
        rows[-2]["pcc_gene_all_cells"] = float(np.nanmean(pcc_per_gene(pred[everywhere], truth[everywhere])))
        rows[-2]["n_cells"] = int(everywhere.sum())
    table = pd.DataFrame(rows)
    for _, r in table[table["method"] == "bitro"].iterrows():
        logger.info(
            "Cells of %s: PCC_gene %.3f, within-spot %.3f (equal split %.3f, 0).",
            r["group"],
            r["pcc_gene"],
            r["within_spot"],
            float(table[(table["group"] == r["group"]) & (table["method"] == "equal split")]["pcc_gene"].iloc[0]),
        )
    return table.rename(columns={"group": library_key or "group"})
