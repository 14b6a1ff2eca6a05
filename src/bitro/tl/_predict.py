"""Prediction: bag-level expression, pseudo-cell expression and attention."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from bitro._constants import Key
from bitro._features import record_of
from bitro._logging import logger
from bitro._utils import release_memory

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from bitro.tl._bags import CellData
    from bitro.tl._persist import BitroModel


def _resolve(model: BitroModel, data: Any, cells: AnnData | None, table_key: str | None, cells_key: str):
    """``(sdata or None, the spot/bulk table or None, the cell table)`` of :func:`predict`'s input."""
    from bitro.tl._persist import BitroModel

    if not isinstance(model, BitroModel):
        msg = f"`model` must be a trained model (from `bt.tl.fit` or `bt.tl.load_model`), got {type(model).__name__}."
        raise TypeError(msg)
    key = table_key or (Key.SPOTS_TABLE if model.target == "spot" else Key.BULK_TABLE)
    if isinstance(data, AnnData):
        if cells is None:  # the cell table alone: a slide without spots
            if record_of(data) is None and Key.FEATURES not in data.obsm:
                msg = (
                    "`data` is an AnnData without cell features: pass the cell table as `cells=` with a spot or bulk "
                    "table, or the cell table itself (from `bt.pp.extract_cells(..., reference=model)`)."
                )
                raise ValueError(msg)
            return None, None, data
        return None, data, cells
    from spatialdata import SpatialData

    if not isinstance(data, SpatialData):
        msg = f"`data` must be a SpatialData, a spot/bulk table or a cell table (AnnData), got {type(data).__name__}."
        raise TypeError(msg)
    if table_key is not None and table_key not in data.tables:
        msg = f"Table {table_key!r} not found in the SpatialData; tables: {sorted(data.tables)}."
        raise KeyError(msg)
    if cells is None:
        if cells_key not in data.tables:
            msg = (
                f"No cell table {cells_key!r} in the SpatialData (tables: {sorted(data.tables)}): segment nuclei and "
                "extract cells first (`bt.pp.segment_nuclei`, `bt.pp.extract_cells(sdata, reference=model)`)."
            )
            raise KeyError(msg)
        cells = data.tables[cells_key]
    return data, data.tables.get(key), cells


def _predicted_table(
    values: np.ndarray, obs: pd.DataFrame, xy: np.ndarray | None, model: BitroModel, attrs: dict | None
) -> AnnData:
    """An AnnData of predictions (rows x the model's genes), annotating the elements ``attrs`` names.

    ``.var`` holds the model's per-gene scores (``config.gene_scores``: column -> one value per gene), if any.
    """
    from spatialdata.models import TableModel

    var = pd.DataFrame(model.config.gene_scores or {}, index=pd.Index(model.genes))
    out = AnnData(np.asarray(values, dtype=np.float32), obs=obs, var=var)
    if xy is not None:
        out.obsm[Key.SPATIAL] = np.asarray(xy, dtype=np.float64)
    if attrs:
        region_key, instance_key = attrs["region_key"], attrs["instance_key"]
        out.obs[region_key] = pd.Categorical(out.obs[region_key].astype(str))
        return TableModel.parse(
            out, region=list(out.obs[region_key].cat.categories), region_key=region_key, instance_key=instance_key
        )
    return out


def _table_attrs(table: AnnData | None) -> dict | None:
    from spatialdata.models import TableModel

    attrs = table.uns.get(TableModel.ATTRS_KEY) if table is not None else None
    if not attrs or attrs.get("region_key") not in table.obs or attrs.get("instance_key") not in table.obs:
        return None
    return {"region_key": attrs["region_key"], "instance_key": attrs["instance_key"]}


def predict(
    model: BitroModel,
    data: AnnData | SpatialData,
    *,
    cells: AnnData | None = None,
    coverage: Literal["tissue", "spots"] = "tissue",
    table_key: str | None = None,
    cells_key: str | None = None,
    graph_key: str = Key.GRAPH,
    phenotype_key: str = Key.PHENOTYPE,
    key_added: str = Key.PREDICTED,
    spots_key_added: str = Key.PREDICTED_SPOTS_TABLE,
    cells_key_added: str = Key.PREDICTED_CELLS_TABLE,
    tokens_per_batch: int = 8192,
) -> AnnData:
    """Predict expression for every spot and every cell of any H&E slide with a trained model.

    Works on slides the model never saw (their cells extracted with ``reference=model``) and on slides with
    no spatial data at all. A spot model predicts the measured spots of a slide from their cells and context,
    as in training, and predicts the cells from *virtual spots*: circles of the training spot size laid over
    the tissue (:func:`bitro.pp.virtual_spots`), so that every cell gets a value. A bulk model predicts each
    slide from all its cells. A patch model (``"m2ort"``, ``"cmrcnet"``) predicts the spots (measured or virtual)
    that ``bt.pp.spot_patches`` cut patches around, and no cells. A BiTro spot model with retrieval
    (``retrieval_weight``, the default of :func:`bitro.tl.fit`) blends each spot's prediction with the training
    spots' measured profiles most similar to it; the cells keep the network's own values. A BiTro spot model with
    fields of cells (``field_radii``, the default of :func:`bitro.tl.fit`) computes each spot's and virtual spot's
    fields from the cell table given here (the mean features of its cells within each radius). A BiTro model with patch
    tokens (``patch_key`` of :func:`bitro.tl.fit`) reads each spot's patch embedding from the spot table (same
    ``.obsm`` key and width as in training), so it predicts measured spots only, and their cells (``coverage="spots"``
    whatever is asked); a slide without a spot table holding it is refused.

    Parameters
    ----------
    model
        A model from :func:`bitro.tl.fit` or :func:`bitro.tl.load_model`.
    data
        A SpatialData with the cell table (and, if measured, the spot or bulk table); or the spot / bulk table
        with ``cells=``; or the cell table alone (a slide without spots). Its expression, if any, is not used.
    cells
        The cell table, when ``data`` is a spot / bulk table (the patch table, for a patch model).
    coverage
        Which cells a spot model predicts: ``"tissue"`` every cell (of the sections in the spot table, when one
        is given), from virtual spots over the tissue; ``"spots"`` only the cells inside measured spots, from
        those spots (the others are left out of the cell table; cheaper when only spots matter). Slides without
        measured spots always use ``"tissue"``.
    table_key
        The spot / bulk table of a SpatialData (default ``"spots"`` / ``"bulk"``; none is needed).
    cells_key
        The cell table of a SpatialData; default ``"cells"``, or ``"patches"`` for a patch model.
    graph_key
        The cell graph, as ``bt.pp.spatial_graph(key_added=...)`` wrote it.
    phenotype_key
        The cell phenotypes column (copied into the cell expression table), as ``bt.pp.phenotypes`` wrote it.
    key_added
        Where the measured spots' (or bulk rows') predictions go in the input table's ``.obsm``.
    spots_key_added, cells_key_added
        Names of the prediction tables written into a SpatialData.
    tokens_per_batch
        Cells per forward pass (bounds memory).

    Returns
    -------
    The cell expression table: cells x the model's genes, ``X`` = predicted expression on the model's target
    scale (``model.scale``, e.g. log1p CP10k; ``.var`` holds the model's per-gene scores, if it has any),
    averaged over the (virtual) spots that hold the cell, and floored at 0 (the scale's value for no counts; spot
    predictions too). With the default ``readout="cell"`` of
    :func:`bitro.tl.fit` a cell's value is its own readout at the training's mean spot size, whatever the number of
    cells in its spot, and the spot's prediction is the attention-weighted mean of its cells' plus the spot's size
    term (:func:`bitro.tl.fit`'s ``bag_size``); with ``readout="gene"`` or ``"shared"`` it is the cell's attention
    relative to an equal share of its spot, times the spot's prediction (the paper's Eq. 10), so that the plain mean
    over a spot's cells is the spot's prediction. ``.obs``: ``"sample"``, ``"phenotype"`` (if the cell table has
    one), ``"spot_id"``, ``"n_bags"`` and the region / instance keys of the cell table (it annotates the cell
    shapes); ``.obsm["spatial"]``: centroids in section pixels; ``.uns["bitro"]``: pixel sizes and the
    parameters. Also written:

    - with a measured spot / bulk table: ``.obsm[key_added]`` on it, a :class:`pandas.DataFrame` (rows x the
      model's genes); ``.obs["n_cells"]`` (cells inside) and ``.obs["predicted_from"]`` (``"spot"``: its own
      cells; ``"context"``: none inside, pooled from the cells around it; ``"none"``: no cell near, NaN row).
    - into a SpatialData: the spot predictions as ``sdata[spots_key_added]`` (measured spots with a prediction,
      or the virtual spots, whose circles are added as shapes ``"{sample}_virtual_spots"``; rows x genes,
      annotating the spot circles) and the cell expression table as ``sdata[cells_key_added]``. A bulk model
      writes its slide predictions as ``sdata[spots_key_added]`` too (one row per slide, annotating nothing).

    A patch model returns the spot predictions instead (spots x genes, as ``sdata[spots_key_added]``), writes
    ``.obsm[key_added]`` and ``.obs["predicted_from"]`` (``"patch"``, or ``"none"`` for a spot without tokens) on the
    spot table (without one: the spots of the patch table), and predicts no cells.

    Examples
    --------
    >>> expr = bt.tl.predict(model, sdata)  # doctest: +SKIP
    >>> sc.tl.rank_genes_groups(expr, "phenotype")  # doctest: +SKIP

    A patch model returns the spot predictions (spots x genes) instead of a cell table:

    >>> bt.pp.spot_patches(new_sdata)  # doctest: +SKIP
    >>> spots = bt.tl.predict(m2ort_model, new_sdata)  # doctest: +SKIP
    """
    from bitro.pp._virtual import virtual_spots
    from bitro.tl._bags import (
        bag_embeddings,
        bulk_bags,
        cell_data,
        check_cells_match_spots,
        check_features,
        spot_bags,
    )
    from bitro.tl.models._base import predict_ensemble

    patch_model = reads_patches(model)
    cells_key = cells_key or (Key.PATCHES_TABLE if patch_model else Key.CELLS_TABLE)
    sdata, table, cells = _resolve(model, data, cells, table_key, cells_key)
    if coverage not in ("tissue", "spots"):
        msg = f"coverage={coverage!r}: use 'tissue' (every cell) or 'spots' (only cells inside measured spots)."
        raise ValueError(msg)
    if not (isinstance(tokens_per_batch, int | np.integer) and tokens_per_batch >= 1):
        msg = f"tokens_per_batch must be a positive integer, got {tokens_per_batch!r}."
        raise ValueError(msg)
    patch_key = model.config.patch_key
    check_features(model.config, model.cell_reference, cells, spots=table)
    genes, bag_cfg = model.genes, model.config.bags
    if cells.n_obs == 0:
        warnings.warn("The cell table is empty (no tissue found?): nothing is predicted.", UserWarning, stacklevel=2)
        return _predicted_table(np.zeros((0, len(genes))), pd.DataFrame(index=pd.Index([])), None, model, None)
    feats = cell_data(cells, use_rep=model.config.feature_key, graph_key=graph_key, phenotype_key=phenotype_key)
    if model.target == "spot" and table is not None and not patch_model:
        check_cells_match_spots(table, feats)  # cells and spots of the same slide, not only the same names
    scale = model.zscore.inverse

    def run(bags, desc, *, with_cells=True):
        keep = np.array([b is not None for b in bags], dtype=bool)
        kept = [b for b in bags if b is not None]
        y, cell_sum, n_bags = predict_ensemble(
            model.nets,
            kept,
            feats,
            tokens_per_batch=tokens_per_batch,
            cell_scale=scale if with_cells else None,
            desc=desc,
        )
        if not (np.isfinite(y).all() and (cell_sum is None or np.isfinite(cell_sum).all())):
            msg = (
                "The model predicts NaN or infinite values, so nothing was written; its weights are broken: train it "
                "again (with a smaller learning rate if training diverged), or load a saved copy with `bt.tl.load_model`."
            )
            raise ValueError(msg)
        # expression on a log scale is never below 0 (no counts): the floor of the scale, not a value to trust
        if cell_sum is not None:
            np.maximum(cell_sum, 0.0, out=cell_sum)
        return keep, np.maximum(scale(y), 0.0), cell_sum, n_bags

    if patch_model:  # the spots the patches were cut around, each from its own patch
        table = _spots_of_patches(cells) if table is None else table
        keep, y, _, _ = run(spot_bags(table, feats, context_radius=0.0, max_context=0), "predict spots", with_cells=False)
        table.obs[Key.PREDICTED_FROM] = np.where(keep, "patch", "none")
        rows, y = _write_rows(table, keep, y, genes, key_added)
        params = {"target": "spot", "scale": model.scale, "n_spots": int(keep.sum()), "n_genes": len(genes)}
        params["features"] = model.config.features["fingerprint"]
        out = _spot_predictions(rows, y, model, params, cells)
        _record_prediction(table, key_added, params)
        if sdata is not None:
            sdata.tables[spots_key_added] = out
        logger.info(f"Predicted {len(genes)} genes for {int(keep.sum())} spots from their patches ({model.config.model}).")
        return out

    spot_out = None
    if model.target == "spot":
        context = {"context_radius": bag_cfg.context_radius, "max_context": bag_cfg.max_context}
        if table is not None:
            embedded = bag_embeddings(model.config, table, feats, target="spot")
            if patch_key is not None and coverage == "tissue":  # virtual spots have no patch embedding
                logger.info("A model with patch tokens predicts the cells of the measured spots only (coverage='spots').")
                coverage = "spots"
            bags = spot_bags(table, feats, empty="context", patches=embedded, **context)
            # with tissue coverage the cells' values come from the virtual spots below: not computed twice
            keep, y, cell_sum, n_bags = run(bags, "predict spots", with_cells=coverage == "spots")
            inside = _cells_per_spot(table, feats)
            table.obs[Key.N_CELLS] = inside
            table.obs[Key.PREDICTED_FROM] = np.where(~keep, "none", np.where(inside > 0, "spot", "context"))
            spot_out = _write_rows(table, keep, y, genes, key_added)  # its rows carry the two columns above
        if table is None or coverage == "tissue":
            radius = _spot_radius(model)
            if table is None:  # the circles go into the SpatialData that holds the cells
                own = sdata is not None and sdata.tables.get(cells_key) is cells
                spots = virtual_spots(sdata if own else cells, diameter_um=2 * radius, cells_key=cells_key)
            else:  # the cells of the sections of the spot table
                samples = table.obs[Key.SAMPLE].astype(str).unique()
                spots = virtual_spots(
                    cells[cells.obs[Key.SAMPLE].astype(str).isin(samples).to_numpy()], diameter_um=2 * radius
                )
            fields = bag_embeddings(model.config, spots, feats, target="spot")
            bags = spot_bags(spots, feats, radius=radius, patches=fields, **context)
            keep, y, cell_sum, n_bags = run(bags, "predict virtual spots")
            if table is None:
                spots.obs[Key.PREDICTED_FROM] = "spot"
                spot_out = (spots[keep], y)
    else:
        if table is None:
            samples = pd.unique(cells.obs[Key.SAMPLE].astype(str))
            table = AnnData(obs=pd.DataFrame({Key.SAMPLE: samples}, index=pd.Index(samples)))
        keep, y, cell_sum, n_bags = run(bulk_bags(table, feats, chunk_size=bag_cfg.chunk_size), "predict slides")
        spot_out = _write_rows(table, keep, y, genes, key_added)

    covered = n_bags > 0
    values = cell_sum  # the covered cells only, in cell order
    obs_cols = [c for c in (Key.SAMPLE, phenotype_key, Key.SPOT_ID) if c in cells.obs]
    attrs = _table_attrs(cells)
    if attrs:
        obs_cols += [c for c in (attrs["region_key"], attrs["instance_key"]) if c not in obs_cols]
    obs = cells.obs.loc[covered, obs_cols].copy()
    obs[Key.N_BAGS] = n_bags[covered]
    expr = _predicted_table(values, obs, np.asarray(cells.obsm[Key.SPATIAL])[covered], model, attrs)
    params = {
        "target": model.target,
        "scale": model.scale,
        "coverage": coverage if table is not None or model.target == "bulk" else "tissue",
        "n_cells": int(covered.sum()),
        "n_cells_left_out": int((~covered).sum()),
        "n_genes": len(genes),
        "features": model.config.features["fingerprint"],
    }
    in_x = {Key.PREDICTIONS_IN_X: params}  # the records of predictions, keyed by where they are: here .X
    expr.uns[Key.UNS] = {Key.PIXEL_SIZE: dict(cells.uns[Key.UNS][Key.PIXEL_SIZE]), Key.PREDICT: in_x}
    if (~covered).any():
        logger.info(f"{int((~covered).sum())} of {cells.n_obs} cells lie in no spot's bag and are left out.")
    if sdata is not None:
        sdata.tables[spots_key_added] = _spot_predictions(*spot_out, model, params, cells)
        sdata.tables[cells_key_added] = expr
    if table is not None and key_added in table.obsm:
        _record_prediction(table, key_added, params)
    logger.info(f"Predicted {len(genes)} genes for {int(covered.sum())} cells ({model.target} model).")
    release_memory()
    return expr


def _spot_predictions(rows: AnnData, y: np.ndarray, model: BitroModel, params: dict, cells: AnnData) -> AnnData:
    """The table of spot (or slide) predictions written into a SpatialData, with its record and pixel sizes."""
    out = _predicted_table(y, rows.obs.copy(), rows.obsm.get(Key.SPATIAL), model, _table_attrs(rows))
    out.uns[Key.UNS] = {Key.PREDICT: {Key.PREDICTIONS_IN_X: params}}
    if Key.PIXEL_SIZE in cells.uns[Key.UNS]:
        out.uns[Key.UNS][Key.PIXEL_SIZE] = dict(cells.uns[Key.UNS][Key.PIXEL_SIZE])
    return out


def _record_prediction(table: AnnData, key_added: str, params: dict) -> None:
    """Record on ``table`` where its predictions went (``.obsm[key_added]``) and on what scale, beside earlier ones."""
    records = table.uns.setdefault(Key.UNS, {}).get(Key.PREDICT)
    if not isinstance(records, dict) or "scale" in records:  # none yet, or one record of bitro < 0.2
        records = {}
    table.uns[Key.UNS][Key.PREDICT] = {**records, key_added: params}


def reads_patches(model: Any) -> bool:
    """Whether a trained ``model`` reads a patch table (``bt.pp.spot_patches``) rather than cells."""
    from bitro.tl.models import MODELS

    name = getattr(getattr(model, "config", None), "model", None)
    return name in MODELS and MODELS[name].reads_patches


def _spots_of_patches(patches: AnnData) -> AnnData:
    """A spot table of the spots a patch table was cut around: sample, spot id, centre (its tokens' mean)."""
    keys = patches.obs[Key.SAMPLE].astype(str) + "\x00" + patches.obs[Key.SPOT_ID].astype(str)
    first = ~keys.duplicated().to_numpy()
    xy = pd.DataFrame(np.asarray(patches.obsm[Key.SPATIAL])[:, :2]).groupby(keys.to_numpy(), sort=False).mean()
    obs = patches.obs.loc[first, [Key.SAMPLE, Key.SPOT_ID]].copy()
    obs.index = pd.Index(keys[first].str.replace("\x00", "_").to_numpy())
    out = AnnData(obs=obs)
    out.obsm[Key.SPATIAL] = xy.loc[keys[first].to_numpy()].to_numpy()
    return out


def _spot_radius(model: BitroModel) -> float:
    radius = model.config.bags.spot_radius
    if not radius:
        msg = "The model records no spot size (`config.bags.spot_radius`); it cannot lay virtual spots."
        raise ValueError(msg)
    return float(radius)


def _cells_per_spot(table: AnnData, feats: CellData) -> np.ndarray:
    """How many cells of the cell table lie inside each spot of ``table`` (matched by sample and spot id)."""
    s_id = (table.obs[Key.SPOT_ID] if Key.SPOT_ID in table.obs else table.obs_names.to_series()).astype(str)
    keys = table.obs[Key.SAMPLE].astype(str).to_numpy() + "\x00" + s_id.to_numpy()
    counts = pd.Series(feats.sample + "\x00" + feats.spot_id.astype(str)).value_counts()
    return counts.reindex(keys).fillna(0).to_numpy(dtype=int)


def _write_rows(table: AnnData, keep: np.ndarray, y: np.ndarray, genes: list[str], key: str):
    """Write row predictions to ``table.obsm[key]`` (NaN where nothing was predicted); the predicted rows."""
    pred = np.full((table.n_obs, len(genes)), np.nan, dtype=np.float32)
    pred[keep] = y
    table.obsm[key] = pd.DataFrame(pred, index=table.obs_names, columns=genes)
    return table[keep], y
