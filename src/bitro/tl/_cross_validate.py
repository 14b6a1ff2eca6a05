"""Leave-one-slide-out (or leave-one-patient-out) cross-validation with the trivial baselines beside."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from bitro._constants import Key
from bitro._deprecate import renamed_args
from bitro._logging import logger
from bitro._settings import settings

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

#: The baselines' predictions (the model's are ``Key.PREDICTED``, reported under the model's name).
_METHOD_LAYERS = {"mean": Key.BASELINE_MEAN, "ridge": Key.BASELINE_RIDGE}


def _fold_cells(
    cells: AnnData, train: np.ndarray, n_clusters: int, seed: int, *, use_rep: str, phenotype_key: str
) -> AnnData:
    """A copy of the cell table whose PCA (``.obsm[use_rep]``) and phenotypes are fitted on the training cells only."""
    from bitro._reducer import apply_reducer, fit_reducer
    from bitro.pp import phenotypes

    out = cells.copy()
    raw = np.asarray(out.obsm[Key.FEATURES_RAW], dtype=np.float64)
    n_components = out.obsm[use_rep].shape[1]
    reducer = fit_reducer(raw[train], n_components, seed=seed)
    out.obsm[use_rep] = apply_reducer(raw, reducer)
    reference = out[train].copy()
    phenotypes(reference, n_clusters=n_clusters, use_rep=use_rep, key_added=phenotype_key, seed=seed)
    phenotypes(out, reference=reference, use_rep=use_rep, key_added=phenotype_key)
    return out


@renamed_args(groupby="library_key")
def cross_validate(
    data: SpatialData | AnnData,
    *,
    cells: AnnData | None = None,
    table_key: str = Key.SPOTS_TABLE,
    cells_key: str | None = None,
    library_key: str = Key.SAMPLE,
    folds: list[str] | None = None,
    genes: list[str] | None = None,
    scale: str = "cp10k",
    baselines: bool = True,
    refit_features: bool | None = None,
    n_clusters: int = 8,
    seed: int = 0,
    **fit_kwargs: Any,
) -> pd.DataFrame:
    """Leave-one-group-out evaluation of :func:`bitro.tl.fit`, beside the trivial baselines.

    For each held-out group (a section, or a patient with ``library_key="patient"``), the model is fitted
    on the other groups (early stopping on a validation section drawn from those, never from the
    held-out one; see ``validation`` of :func:`bitro.tl.fit`), predicts the held-out spots and is scored
    with :func:`bitro.tl.evaluate`. The cell features' scaler + PCA and the phenotypes are refitted
    on the training cells of each fold (``refit_features``), so nothing is learnt from the held-out group.

    Baselines, on the same genes and scale: ``"mean"``, the training-mean profile, and ``"ridge"``,
    ridge regression on color statistics of each spot's image patch (needs the images, i.e. a
    SpatialData, or precomputed ``.obsm["bitro_color"]``, see :func:`bitro.tl.color_statistics`).

    Parameters
    ----------
    data
        SpatialData with the ``"spots"`` and ``"cells"`` tables (and images for the ridge baseline),
        or the spot table with ``cells=``.
    cells
        The cell table, when ``data`` is an AnnData (the patch table, for a patch model: ``model=`` in
        ``fit_kwargs``).
    table_key
        The spot table of a SpatialData.
    cells_key
        The cell table of a SpatialData; default ``"cells"``, or ``"patches"`` for a patch model.
    library_key
        Column of the spot table's ``.obs`` that defines the folds; each of its values must hold whole
        sections.
    folds
        Hold out only these groups (default: every group).
    genes
        Genes to predict (default: chosen by :func:`bitro.tl.fit` on the training groups of each fold).
    scale
        Target scale, ``"cp10k"``, ``"log1p"`` or ``"hist2st"``.
    baselines
        Also score the training-mean profile and the ridge baseline.
    refit_features
        Refit the scaler + PCA and the phenotypes on each fold's training cells. Default: ``True`` for a model that
        reads cells; a patch model's patches have nothing fitted to refit.
    n_clusters
        Phenotypes per fold (with ``refit_features``).
    seed
        Random seed of the model and of the refitted features.
    **fit_kwargs
        Passed on to :func:`bitro.tl.fit`.

    Returns
    -------
    A tidy table, one row per held-out group and method (the model's name, ``"bitro"`` by default; ``"mean"``,
    ``"ridge"``), with
    ``pcc_overall``, ``pcc_gene``, ``n_obs``, ``n_genes`` and ``n_genes_constant``
    (genes with zero variance in the held-out truth, left out of PCC_gene), plus one ``"mean"`` row
    per method averaged over the folds.

    Examples
    --------
    >>> scores = bt.tl.cross_validate(sdata, epochs=30)  # doctest: +SKIP
    >>> scores.pivot(index="held_out", columns="method", values="pcc_gene")  # doctest: +SKIP
    """
    from anndata import AnnData

    from bitro.tl._bags import resolve_tables
    from bitro.tl._baselines import add_baselines, color_statistics
    from bitro.tl._evaluate import evaluate
    from bitro.tl._fit import fit
    from bitro.tl._predict import predict
    from bitro.tl._targets import check_scale
    from bitro.tl.models import DEFAULT_MODEL, get_model

    check_scale(scale)
    spec = get_model(fit_kwargs.get("model", DEFAULT_MODEL))
    patch_model = spec.reads_patches
    if refit_features and patch_model:
        msg = f"refit_features=True refits cell features, but model={spec.name!r} reads spot patches; leave it unset."
        raise ValueError(msg)
    refit_features = not patch_model if refit_features is None else refit_features
    cells_key = cells_key or spec.architecture.input_table
    spots, cells = resolve_tables(data, "spot", cells=cells, table_key=table_key, cells_key=cells_key)
    if library_key not in spots.obs:
        msg = f"`library_key={library_key!r}` is not a column of the spot table's `.obs` (columns: {list(spots.obs.columns)})."
        raise KeyError(msg)
    group_of_sample = spots.obs.groupby(Key.SAMPLE, observed=True)[library_key].nunique()
    if (group_of_sample > 1).any():
        msg = f"Sections {list(group_of_sample.index[group_of_sample > 1])} are split across `{library_key}` groups."
        raise ValueError(msg)
    groups = list(dict.fromkeys(spots.obs[library_key].astype(str)))
    if len(groups) < 3:
        msg = f"Cross-validation needs at least 3 `{library_key}` groups (train, validation, test); got {groups}."
        raise ValueError(msg)
    folds = groups if folds is None else list(folds)
    unknown = sorted(set(folds) - set(groups))
    if unknown:
        msg = f"Folds {unknown} are not `{library_key}` groups; groups: {groups}."
        raise KeyError(msg)
    if refit_features and Key.FEATURES_RAW not in cells.obsm:
        msg = f"`refit_features=True` needs the raw features `.obsm[{Key.FEATURES_RAW!r}]` of `bt.pp.extract_cells`."
        raise KeyError(msg)
    if baselines and Key.COLOR_STATS not in spots.obsm:
        if isinstance(data, AnnData):
            msg = (
                "The ridge baseline needs color statistics of the spot patches: pass the SpatialData, or "
                "run `bt.tl.color_statistics(sdata)` first, or `baselines=False`."
            )
            raise ValueError(msg)
        color_statistics(data, table_key=table_key)

    keys = {
        "use_rep": fit_kwargs.get("use_rep") or spec.architecture.default_rep,
        "phenotype_key": fit_kwargs.get("phenotype_key", Key.PHENOTYPE),
    }
    graph = {k: fit_kwargs[k] for k in ("graph_key", "phenotype_key") if k in fit_kwargs}
    rows = []
    group = spots.obs[library_key].astype(str).to_numpy()
    cell_samples = cells.obs[Key.SAMPLE].astype(str).to_numpy()
    for held_out in tqdm(folds, desc="cross-validation", disable=not settings.progress):
        test_mask = group == held_out
        train, test = spots[~test_mask].copy(), spots[test_mask].copy()
        train_samples = set(train.obs[Key.SAMPLE].astype(str))
        fold_cells = (
            _fold_cells(cells, np.isin(cell_samples, list(train_samples)), n_clusters, seed, **keys)
            if refit_features
            else cells
        )
        model = fit(
            train, target="spot", cells=fold_cells, genes=genes, scale=scale, seed=seed, **fit_kwargs
        )
        predict(model, test, cells=fold_cells, coverage="spots", **graph)  # only the spots are scored
        if baselines:
            add_baselines(train, test, genes=model.genes, scale=scale)
        for method, layer in {spec.name: Key.PREDICTED, **_METHOD_LAYERS}.items():
            if layer in test.obsm:
                score = evaluate(test, layer=layer, scale=scale, library_key=None, key_added=f"{layer}_eval")
                rows.append({"held_out": held_out, "method": method, **score.iloc[0].to_dict()})
        logger.info(
            "Fold %s: %s",
            held_out,
            ", ".join(f"{r['method']} PCC_gene {r['pcc_gene']:.3f}" for r in rows if r["held_out"] == held_out),
        )
    table = pd.DataFrame(rows)
    means = table.groupby("method", sort=False)[["pcc_overall", "pcc_gene"]].mean().reset_index()
    means.insert(0, "held_out", "mean")
    return pd.concat([table, means], ignore_index=True)
