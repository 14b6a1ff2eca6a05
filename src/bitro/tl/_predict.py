"""Prediction: bag-level expression, pseudo-cell expression and attention."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from bitro._constants import Key
from bitro._features import FEATURE_SETTINGS, FIX, differences, fingerprint, plain, record_of
from bitro._logging import logger
from bitro._settings import settings
from bitro._utils import release_memory

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from bitro.tl._bags import CellData, Seq
    from bitro.tl._model import BitroNet
    from bitro.tl._persist import BitroModel


def _groups(parts: list[tuple[int, Seq]], tokens_per_batch: int) -> list[list[tuple[int, Seq]]]:
    groups, cur, n = [], [], 0
    for p in parts:
        if cur and n + len(p[1].cells) > tokens_per_batch:
            groups.append(cur)
            cur, n = [], 0
        cur.append(p)
        n += len(p[1].cells)
    if cur:
        groups.append(cur)
    return groups


def predict_bags(
    nets: Sequence[BitroNet],
    bags: Sequence[Sequence[Seq]],
    cells: CellData,
    *,
    tokens_per_batch: int = 8192,
    cell_scale: Callable[[np.ndarray], np.ndarray] | None = None,
    desc: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Predictions (z-scores, ensemble mean) of ``bags``, and optionally the cell expression they imply.

    Every sequence is encoded on its own and the pooling of a bag is combined over its sequences
    exactly (:func:`~bitro.tl._model.combine_parts`), so memory is bounded by ``tokens_per_batch``
    whatever the bag size, and a bag's result does not depend on how sequences are packed.

    With ``cell_scale`` (a map from z-scores ``(n, n_genes)`` to the target scale), each pooled cell ``i`` of
    a bag ``b`` gets a value on the target scale: with the ``"cell"`` readout its own readout at the training's
    mean bag size (so it does not depend on how many cells share the bag; the attention-weighted mean of a bag's
    cells plus the bag's size term is the bag's prediction); otherwise ``n_b * A[g, i] * y[b, g]``,
    its attention relative to an equal share of the bag's ``n_b`` pooled cells times the bag's prediction,
    whose plain mean is the bag's prediction. These are summed over the bags that pool the cell and averaged
    over the ensemble.

    Returns
    -------
    ``y`` ``(n_bags, n_genes)``; with ``cell_scale`` also the cell values, averaged over the bags that pool each
    cell, for the cells pooled by at least one bag only ``(n_covered, n_genes)`` (float32, in cell order), and how
    many bags pooled each cell ``(n_cells,)``; else ``None, None``.
    """
    import torch
    from tqdm.auto import tqdm

    from bitro.tl._bags import collate, log_cell_count
    from bitro.tl._model import combine_parts

    parts = [(b, s) for b, bag in enumerate(bags) for s in bag]
    groups = _groups(parts, tokens_per_batch)
    last_group = {}
    for gi, group in enumerate(groups):
        for b, _ in group:
            last_group[b] = gi
    n_genes, n_cells = nets[0].arch.n_genes, len(cells.features)
    n_pool = np.array([sum(s.n_pool for s in bag) for bag in bags], dtype=np.float32)
    y_sum = np.zeros((len(bags), n_genes))
    cell_sum = row_of = n_bags = None
    if cell_scale is not None:  # rows only for the cells some bag pools: a slide's uncovered cells cost nothing
        n_bags = np.bincount(
            np.concatenate([np.zeros(0, np.int64), *(s.cells[: s.n_pool] for bag in bags for s in bag)]),
            minlength=n_cells,
        )
        row_of = np.cumsum(n_bags > 0) - 1
        cell_sum = np.zeros((int((n_bags > 0).sum()), n_genes), dtype=np.float32)
    device = next(nets[0].parameters()).device
    sizes = torch.tensor([log_cell_count(bag) for bag in bags], dtype=torch.float32, device=device)
    bar = tqdm(total=len(nets) * len(groups), desc=desc or "predict", disable=not settings.progress or desc is None)
    for net in nets:
        net.eval()
        pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        tokens: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # bag -> [(cell rows, logits)]
        with torch.no_grad():
            for gi, group in enumerate(groups):
                batch = collate([[s] for _, s in group], cells).to(device)
                h = net.encode(batch)
                logits, lse, z = net.attend(h[batch.pool], batch.pooled_bag, batch.n_bags)
                bag_ids = np.array([b for b, _ in group])
                uniq, local = np.unique(bag_ids, return_inverse=True)
                lse_b, z_b = combine_parts(lse, z, torch.as_tensor(local, device=device), len(uniq))
                if cell_sum is not None:
                    token_bag = torch.as_tensor(local, device=device)[batch.pooled_bag]
                    rows = batch.cell[batch.pool]
                    own = net.cell_readout(h[batch.pool]) if net.arch.readout == "cell" else logits
                for j, b in enumerate(uniq):
                    cur = (lse_b[j : j + 1], z_b[j : j + 1])
                    if b in pending:
                        prev = pending.pop(b)
                        both = torch.zeros(2, dtype=torch.long, device=device)
                        cur = combine_parts(torch.cat([prev[0], cur[0]]), torch.cat([prev[1], cur[1]]), both, 1)
                    if cell_sum is not None:
                        mine = token_bag == j
                        tokens.setdefault(b, []).append((rows[mine].cpu(), own[mine].cpu()))
                    if last_group[b] != gi:
                        pending[b] = cur
                        continue
                    yz = net.readout(cur[1], sizes[b : b + 1])[0].cpu().numpy()
                    y_sum[b] += yz
                    if cell_sum is not None:
                        r = row_of[torch.cat([t[0] for t in tokens[b]]).numpy()]
                        own_b = torch.cat([t[1] for t in tokens.pop(b)])
                        if net.arch.readout == "cell":  # the cells' own readout, at the training's mean bag size
                            cell_sum[r] += cell_scale(own_b.numpy()).astype(np.float32)
                        else:  # attention relative to an equal share, times the bag's prediction
                            att = torch.exp(own_b - cur[0][0].cpu()).numpy()
                            cell_sum[r] += n_pool[b] * att * cell_scale(yz[None])[0].astype(np.float32)
                bar.update()
    bar.close()
    y = y_sum / len(nets)
    if cell_sum is None:
        return y, None, None
    # the mean over the ensemble and over the bags pooling each cell, in place (the table's own memory)
    np.divide(cell_sum, (len(nets) * n_bags[n_bags > 0])[:, None].astype(np.float32), out=cell_sum)
    return y, cell_sum, n_bags


def feature_config(cells: AnnData, feature_key: str) -> dict[str, Any]:
    """What a model records of its training cells' features: the settings that define them and the fingerprint."""
    from bitro._utils import check_key

    record = record_of(cells)
    if record is None:
        msg = (
            f"The cell table has no extraction record `.uns[{Key.UNS!r}][{Key.EXTRACT_CELLS!r}]`, so nothing says what "
            "its features mean and new slides could not be matched to them. Build the cell table with "
            "`bt.pp.extract_cells` (any encoder, including your own callable)."
        )
        raise ValueError(msg)
    check_key(cells.obsm, feature_key, "Cell features .obsm")
    return {
        **{k: plain(record.get(k)) for k in FEATURE_SETTINGS},
        "feature_key": feature_key,
        "n_features": int(np.shape(cells.obsm[feature_key])[1]),
        "feature_names": plain(record.get("feature_names", [])),
        "fingerprint": fingerprint(record),
    }


def check_features(model: BitroModel, cells: AnnData) -> None:
    """Raise, in one line, when the cell table's features do not mean what the model was trained on."""
    from bitro._utils import check_key

    key, dim = model.config["feature_key"], model.config["architecture"]["n_features"]
    check_key(cells.obsm, key, "Cell features .obsm")
    record = record_of(cells)
    if record is None:
        msg = (
            f"The cell table has no extraction record `.uns[{Key.UNS!r}][{Key.EXTRACT_CELLS!r}]`, so its features "
            f"cannot be checked against the model's. {FIX}."
        )
        raise ValueError(msg)
    trained = model.config["features"]
    if fingerprint(record) != trained["fingerprint"]:
        why = differences(model.cell_reference.get(Key.EXTRACT_CELLS, trained), record)
        why = why or "the scaler + PCA differs from the model's"
        msg = f"The cell features do not match the model's: {why}. {FIX}."
        raise ValueError(msg)
    got = np.shape(cells.obsm[key])[1]
    if got != dim:
        msg = (
            f"The model was trained on {dim}-dimensional cell features .obsm[{key!r}], the cell table has {got}. {FIX}."
        )
        raise ValueError(msg)


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

    ``.var`` holds the model's per-gene scores (``config["gene_scores"]``: column -> one value per gene), if any.
    """
    from spatialdata.models import TableModel

    var = pd.DataFrame(model.config.get("gene_scores", {}), index=pd.Index(model.genes))
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
    cells_key: str = Key.CELLS_TABLE,
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
    slide from all its cells.

    Parameters
    ----------
    model
        A model from :func:`bitro.tl.fit` or :func:`bitro.tl.load_model`.
    data
        A SpatialData with the cell table (and, if measured, the spot or bulk table); or the spot / bulk table
        with ``cells=``; or the cell table alone (a slide without spots). Its expression, if any, is not used.
    cells
        The cell table, when ``data`` is a spot / bulk table.
    coverage
        Which cells a spot model predicts: ``"tissue"`` every cell (of the sections in the spot table, when one
        is given), from virtual spots over the tissue; ``"spots"`` only the cells inside measured spots, from
        those spots (the others are left out of the cell table; cheaper when only spots matter). Slides without
        measured spots always use ``"tissue"``.
    table_key
        The spot / bulk table of a SpatialData (default ``"spots"`` / ``"bulk"``; none is needed).
    cells_key
        The cell table of a SpatialData.
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

    Examples
    --------
    >>> expr = bt.tl.predict(model, sdata)  # doctest: +SKIP
    >>> sc.tl.rank_genes_groups(expr, "phenotype")  # doctest: +SKIP
    """
    from bitro.pp._virtual import virtual_spots
    from bitro.tl._bags import bulk_bags, cell_data, check_cells_match_spots, spot_bags

    sdata, table, cells = _resolve(model, data, cells, table_key, cells_key)
    if coverage not in ("tissue", "spots"):
        msg = f"coverage={coverage!r}: use 'tissue' (every cell) or 'spots' (only cells inside measured spots)."
        raise ValueError(msg)
    if not (isinstance(tokens_per_batch, int | np.integer) and tokens_per_batch >= 1):
        msg = f"tokens_per_batch must be a positive integer, got {tokens_per_batch!r}."
        raise ValueError(msg)
    check_features(model, cells)
    genes, bag_cfg = model.genes, model.config["bags"]
    if cells.n_obs == 0:
        warnings.warn("The cell table is empty (no tissue found?): nothing is predicted.", UserWarning, stacklevel=2)
        return _predicted_table(np.zeros((0, len(genes))), pd.DataFrame(index=pd.Index([])), None, model, None)
    feats = cell_data(cells, feature_key=model.config["feature_key"])
    if model.target == "spot" and table is not None:
        check_cells_match_spots(table, feats)  # cells and spots of the same slide, not only the same names
    scale = model.zscore.inverse

    def run(bags, desc, *, with_cells=True):
        keep = np.array([b is not None for b in bags], dtype=bool)
        kept = [b for b in bags if b is not None]
        y, cell_sum, n_bags = predict_bags(
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

    spot_out = None
    if model.target == "spot":
        context = {"context_radius": bag_cfg["context_radius"], "max_context": bag_cfg["max_context"]}
        if table is not None:
            bags = spot_bags(table, feats, empty="context", **context)
            # with tissue coverage the cells' values come from the virtual spots below: not computed twice
            keep, y, cell_sum, n_bags = run(bags, "predict spots", with_cells=coverage == "spots")
            inside = _cells_per_spot(table, feats)
            spot_out = _write_rows(table, keep, y, genes, key_added)
            table.obs[Key.N_CELLS] = inside
            table.obs[Key.PREDICTED_FROM] = np.where(~keep, "none", np.where(inside > 0, "spot", "context"))
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
            keep, y, cell_sum, n_bags = run(spot_bags(spots, feats, radius=radius, **context), "predict virtual spots")
            if table is None:
                spots.obs[Key.PREDICTED_FROM] = "spot"
                spot_out = (spots[keep], y)
    else:
        if table is None:
            samples = pd.unique(cells.obs[Key.SAMPLE].astype(str))
            table = AnnData(obs=pd.DataFrame({Key.SAMPLE: samples}, index=pd.Index(samples)))
        keep, y, cell_sum, n_bags = run(bulk_bags(table, feats, chunk_size=bag_cfg["chunk_size"]), "predict slides")
        spot_out = _write_rows(table, keep, y, genes, key_added)

    covered = n_bags > 0
    values = cell_sum  # the covered cells only, in cell order
    obs_cols = [c for c in (Key.SAMPLE, Key.PHENOTYPE, Key.SPOT_ID) if c in cells.obs]
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
        "features": model.config["features"]["fingerprint"],
    }
    in_x = {**params, "predictions": "X"}  # marks the tables whose .X holds predictions
    expr.uns[Key.UNS] = {Key.PIXEL_SIZE: dict(cells.uns[Key.UNS][Key.PIXEL_SIZE]), Key.PREDICT: in_x}
    if (~covered).any():
        logger.info(f"{int((~covered).sum())} of {cells.n_obs} cells lie in no spot's bag and are left out.")
    if sdata is not None:
        rows, y = spot_out
        spot_table = _predicted_table(
            y, rows.obs.copy(), rows.obsm[Key.SPATIAL] if Key.SPATIAL in rows.obsm else None, model, _table_attrs(rows)
        )
        spot_table.uns[Key.UNS] = {Key.PREDICT: in_x}
        if Key.PIXEL_SIZE in cells.uns[Key.UNS]:
            spot_table.uns[Key.UNS][Key.PIXEL_SIZE] = dict(cells.uns[Key.UNS][Key.PIXEL_SIZE])
        sdata.tables[spots_key_added] = spot_table
        sdata.tables[cells_key_added] = expr
    if table is not None and key_added in table.obsm:
        table.uns.setdefault(Key.UNS, {})[Key.PREDICT] = params
    logger.info(f"Predicted {len(genes)} genes for {int(covered.sum())} cells ({model.target} model).")
    release_memory()
    return expr


def _spot_radius(model: BitroModel) -> float:
    radius = model.config["bags"].get("spot_radius")
    if not radius:
        msg = "The model records no spot size (`config['bags']['spot_radius']`); it cannot lay virtual spots."
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
