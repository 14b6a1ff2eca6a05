"""Score predictions against the observed expression: PCC_overall, PCC_gene, JS divergence."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from bitro._constants import Key
from bitro._deprecate import renamed_args
from bitro._logging import logger
from bitro._utils import get_table
from bitro.tl._metrics import js_divergence, pcc_per_gene, pcc_per_obs
from bitro.tl._targets import SCALES, Scale, check_counts, check_scale, dense, to_scale

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

#: Rows transformed at a time when bringing raw counts to the prediction's scale (bounds memory).
_CHUNK_ROWS = 512


def prediction_matrix(adata: AnnData, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The predictions stored under ``key`` and the ``.var`` indices of their genes: ``(cols, values)``.

    ``.obsm[key]`` as :func:`bitro.tl.predict` writes it (a :class:`pandas.DataFrame`, rows x the model's genes;
    genes that are not in ``.var_names`` cannot be scored and are left out), else a layer ``.layers[key]``
    aligned with ``.var_names`` (the genes with at least one finite value).
    """
    frame = adata.obsm.get(key)
    if isinstance(frame, pd.DataFrame):
        genes = [str(g) for g in frame.columns]
        idx = adata.var_names.get_indexer(genes)
        return idx[idx >= 0], frame.to_numpy(dtype=np.float64)[:, idx >= 0]
    if key in adata.layers:
        x = adata.layers[key]
        x = x.toarray() if sp.issparse(x) else np.asarray(x, dtype=np.float64)
        cols = np.flatnonzero(np.isfinite(x).any(axis=0))
        return cols, x[:, cols]
    msg = (
        f"No predictions under {key!r}: neither `.obsm[{key!r}]` (obsm: {sorted(adata.obsm) or 'none'}) nor "
        f"`.layers[{key!r}]` (layers: {sorted(adata.layers) or 'none'}). Run `bt.tl.predict` first, or pass the key "
        "that holds the predictions as `layer=`."
    )
    raise KeyError(msg)


def prediction_record(adata: AnnData, where: str) -> dict[str, Any] | None:
    """The record ``bt.tl.predict`` kept of the predictions at ``where`` (its ``key_added``, or ``"X"``), if any.

    Records of bitro < 0.2 (one per table, the last ``predict``'s) are read for any ``where``.
    """
    records = adata.uns.get(Key.UNS, {}).get(Key.PREDICT)
    if not isinstance(records, dict):
        return None
    if "scale" in records:  # the one record of an older bitro
        return records if where != Key.PREDICTIONS_IN_X or records.get("predictions") == "X" else None
    record = records.get(where)
    return record if isinstance(record, dict) else None


def prediction_scale(adata: AnnData, scale: str | None, where: str = Key.PREDICTIONS_IN_X) -> str:
    """The target scale of the predictions at ``where``: ``scale`` when given, else the one ``bt.tl.predict`` recorded."""
    if scale is None:
        scale = (prediction_record(adata, where) or {}).get("scale")
    if scale is None:
        msg = (
            f"The scale of the predictions {where!r} is unknown: `bt.tl.predict` recorded none in "
            f"`.uns[{Key.UNS!r}][{Key.PREDICT!r}][{where!r}]`. Pass it as `scale=` (one of {SCALES})."
        )
        raise ValueError(msg)
    check_scale(str(scale))
    return str(scale)


def observed_on_scale(
    adata: AnnData, rows: np.ndarray, cols: np.ndarray, scale: str, *, library: np.ndarray | None = None
) -> np.ndarray:
    """Raw counts of ``.X`` at ``rows`` x ``cols`` on a target scale.

    ``"cp10k"``: library size over all genes of ``.X``; ``"hist2st"``: library size over the predicted genes, the
    ``.var`` indices ``library`` (by default ``cols``: pass the model's genes when ``cols`` is only some of them).
    """
    check_scale(scale)
    out = np.empty((len(rows), len(cols)))
    for start in range(0, len(rows), _CHUNK_ROWS):
        chunk = rows[start : start + _CHUNK_ROWS]
        counts = dense(adata.X[chunk])
        check_counts(counts, "The expression in `.X`")
        out[start : start + len(chunk)] = to_scale(counts, scale, cols, library=library)
    return out


@renamed_args(groupby="library_key")
def evaluate(
    data: AnnData | SpatialData,
    *,
    layer: str = Key.PREDICTED,
    scale: Scale | None = None,
    truth: str | None = None,
    library_key: str | None = Key.SAMPLE,
    table_key: str = Key.SPOTS_TABLE,
    key_added: str = Key.EVALUATION,
) -> pd.DataFrame:
    """Score predicted expression against the observed expression.

    The observed raw counts in ``.X`` are brought to the scale of the predictions
    (``"cp10k"``: ``log1p`` of counts per 10,000 with the library size over all genes of ``.X``;
    ``"log1p"``: ``log1p`` of raw counts; ``"hist2st"``: ``log1p`` of counts per 10,000 with the library
    size over the predicted genes only, those of ``layer`` found in ``.var_names``) and compared, within each
    group of ``library_key`` (a held-out section), on the genes and observations that have predictions:

    - **PCC_overall**: for each observation (spot or bulk sample), the Pearson correlation over
      genes between prediction and truth; the mean over observations. Observations whose truth or
      prediction is constant over the genes are left out.
    - **PCC_gene**: for each gene, the Pearson correlation over the observations of the group; the
      mean over genes. Genes with zero variance in the truth of a group have no correlation: they
      are NaN in ``.var`` and left out of the mean (their number is reported as
      ``n_genes_constant``). Genes with a constant prediction but varying truth count as 0.
    - **JS divergence**: for each observation, the Jensen-Shannon divergence (base 2, between 0
      and 1) between predicted and observed profiles back on the linear scale (``expm1``, negative
      predictions clipped to 0), each normalised to sum 1; the mean over observations whose
      observed and predicted profiles are not all zero. For a bulk table (one row per slide) this
      is the bulk-profile JS divergence.

    Parameters
    ----------
    data
        Spot (or bulk) table with raw counts in ``.X`` and predictions under ``layer``,
        or a SpatialData holding it as table ``table_key``.
    layer
        Where the predictions are: ``.obsm[layer]``, a :class:`pandas.DataFrame` of rows x genes as written by
        :func:`bitro.tl.predict` and :func:`bitro.tl.add_baselines`, or else a layer aligned with ``.var_names``.
        Observations whose predictions are not all finite are not scored.
    scale
        Target scale of the predictions, ``"cp10k"``, ``"log1p"`` or ``"hist2st"`` (see
        :func:`bitro.tl.fit`). By default the scale recorded by :func:`bitro.tl.predict` in
        ``.uns["bitro"]["predict"][layer]["scale"]``.
    truth
        A layer holding the observed expression already on the prediction's scale, used instead
        of transforming ``.X``.
    library_key
        Column of ``.obs`` whose groups are scored separately (e.g. held-out sections).
        ``None`` scores all observations together, e.g. a bulk table of slides.
    table_key
        Table of a SpatialData to score.
    key_added
        Prefix of the slots written.

    Returns
    -------
    One row per group: the group, the number of observations ``n_obs`` and genes ``n_genes``
    scored, ``n_genes_constant`` (genes left out of PCC_gene), ``pcc_overall``, ``pcc_gene`` and
    ``js_divergence``. Also written to the table:

    - ``.var["{key_added}_pcc"]``: PCC_gene of each gene (mean over groups; NaN when undefined),
      and ``.var["{key_added}_pcc_{group}"]`` per group when there is more than one group.
    - ``.obs["{key_added}_pcc"]``: the correlation over genes of each observation.
    - ``.uns[key_added]``: ``"summary"`` (the returned frame), ``"mean"`` (each metric averaged
      over groups), ``"scale"`` and ``"genes"``.
    - ``.uns["bitro"]["evaluate"][key_added]``: the parameters.

    Examples
    --------
    >>> import bitro as bt
    >>> scores = bt.tl.evaluate(adata, scale="cp10k")  # doctest: +SKIP
    >>> scores[["sample", "pcc_overall", "pcc_gene"]]  # doctest: +SKIP
    """
    adata = get_table(data, table_key)
    if not key_added:
        msg = "`key_added` must be a non-empty string."
        raise ValueError(msg)
    cols, pred_all = prediction_matrix(adata, layer)
    if len(cols) == 0:
        msg = f"The predictions {layer!r} hold no finite value for a gene of `.var_names`. Run `bt.tl.predict` first."
        raise ValueError(msg)
    if truth is not None and truth not in adata.layers:
        msg = f"Truth layer {truth!r} not found. Available layers: {sorted(adata.layers) or 'none'}."
        raise KeyError(msg)
    scale = prediction_scale(adata, scale, layer) if truth is None or scale is not None else None
    if library_key is not None and library_key not in adata.obs:
        msg = f"`library_key={library_key!r}` is not a column of `.obs` (columns: {list(adata.obs.columns)}). Use `library_key=None` to score all rows together."
        raise KeyError(msg)
    rows = np.flatnonzero(np.isfinite(pred_all).all(axis=1))
    if len(rows) == 0:
        msg = f"No observation has finite predictions for all {len(cols)} predicted genes in {layer!r}."
        raise ValueError(msg)

    pred = pred_all[rows]
    obs = (
        dense(adata.layers[truth][:, cols])[rows] if truth is not None else observed_on_scale(adata, rows, cols, scale)
    )
    groups = (
        pd.Series(np.asarray(adata.obs[library_key])[rows]).astype(str).to_numpy()
        if library_key is not None
        else np.full(len(rows), "all")
    )
    group_col = library_key if library_key is not None else "group"

    pcc_obs = pcc_per_obs(pred, obs)
    lin_pred, lin_obs = np.clip(np.expm1(pred), 0, None), np.expm1(obs)
    has_mass = (lin_pred.sum(axis=1) > 0) & (lin_obs.sum(axis=1) > 0)  # JS is undefined for an all-zero profile
    summary, per_gene = [], {}
    for g in pd.unique(groups):
        m = groups == g
        r_gene = pcc_per_gene(pred[m], obs[m])
        per_gene[g] = r_gene
        summary.append(
            {
                group_col: g,
                "n_obs": int(m.sum()),
                "n_genes": len(cols),
                "n_genes_constant": int(np.isnan(r_gene).sum()),
                "pcc_overall": float(np.nanmean(pcc_obs[m])) if np.isfinite(pcc_obs[m]).any() else np.nan,
                "pcc_gene": float(np.nanmean(r_gene)) if np.isfinite(r_gene).any() else np.nan,
                "js_divergence": js_divergence(lin_pred[m & has_mass], lin_obs[m & has_mass])
                if (m & has_mass).any()
                else np.nan,
            }
        )
    table = pd.DataFrame(summary)

    gene_pcc = np.full(adata.n_vars, np.nan)
    stacked = np.vstack(list(per_gene.values()))
    with warnings.catch_warnings():  # genes that are NaN in every group stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        gene_pcc[cols] = np.nanmean(stacked, axis=0)
    adata.var[f"{key_added}_pcc"] = gene_pcc
    if len(per_gene) > 1:
        for g, r in per_gene.items():
            col = np.full(adata.n_vars, np.nan)
            col[cols] = r
            adata.var[f"{key_added}_pcc_{g}"] = col
    obs_pcc = np.full(adata.n_obs, np.nan)
    obs_pcc[rows] = pcc_obs
    adata.obs[f"{key_added}_pcc"] = obs_pcc
    metrics = ["pcc_overall", "pcc_gene", "js_divergence"]
    adata.uns[key_added] = {
        "summary": table,
        "mean": {k: float(table[k].mean()) for k in metrics},
        "scale": scale if scale is not None else "as given",
        "genes": np.asarray(adata.var_names[cols], dtype=str),
    }
    params: dict[str, Any] = {
        "layer": layer,
        "scale": scale if scale is not None else "as given",
        "truth": truth if truth is not None else "X",
        "library_key": library_key if library_key is not None else "none",
        "table_key": table_key,
        "key_added": key_added,
    }
    runs = adata.uns.setdefault(Key.UNS, {}).get(Key.EVALUATE)
    if not isinstance(runs, dict) or "layer" in runs:  # none yet, or the one record of bitro < 0.2
        runs = {}
    adata.uns[Key.UNS][Key.EVALUATE] = {**runs, key_added: params}
    logger.info(
        "Scored %d observations x %d genes in %d group(s): PCC_overall %.3f, PCC_gene %.3f, JS %.3f.",
        len(rows),
        len(cols),
        len(table),
        *(adata.uns[key_added]["mean"][k] for k in metrics),
    )
    return table
