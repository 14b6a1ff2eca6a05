"""Prediction: bag-level expression, pseudo-cell expression and attention."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData

from bitro._constants import Key
from bitro._logging import logger
from bitro._settings import settings
from bitro.tl._fit import resolve_tables

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
    attention: bool = False,
    desc: str | None = None,
):
    """Predictions (z-scores, ensemble mean) of ``bags``, and optionally each pooled cell's attention.

    Every sequence is encoded on its own and the pooling of a bag is combined over its sequences
    exactly (:func:`~bitro.tl._model.combine_parts`), so memory is bounded by ``tokens_per_batch``
    whatever the bag size, and a bag's result does not depend on how sequences are packed.

    Returns
    -------
    ``y`` ``(n_bags, n_genes)``, and with ``attention``: the cell rows of the pooled cells and their
    attention ``(n_pooled, n_genes)`` (ensemble mean); else ``None, None``.
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
    n_genes = nets[0].arch.n_genes
    y_sum = np.zeros((len(bags), n_genes))
    att_sum, rows = None, None
    device = next(nets[0].parameters()).device
    sizes = torch.tensor([log_cell_count(bag) for bag in bags], dtype=torch.float32, device=device)
    bar = tqdm(total=len(nets) * len(groups), desc=desc or "predict", disable=not settings.progress or desc is None)
    for net in nets:
        net.eval()
        lse_final = torch.zeros((len(bags), n_genes))
        pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        logit_parts, bag_parts, row_parts = [], [], []
        with torch.no_grad():
            for gi, group in enumerate(groups):
                batch = collate([[s] for _, s in group], cells).to(device)
                h = net.encode(batch)
                logits, lse, z = net.attend(h[batch.pool], batch.pooled_bag, batch.n_bags)
                bag_ids = np.array([b for b, _ in group])
                uniq, local = np.unique(bag_ids, return_inverse=True)
                lse_b, z_b = combine_parts(lse, z, torch.as_tensor(local, device=device), len(uniq))
                for j, b in enumerate(uniq):
                    cur = (lse_b[j : j + 1], z_b[j : j + 1])
                    if b in pending:
                        prev = pending.pop(b)
                        both = torch.zeros(2, dtype=torch.long, device=device)
                        cur = combine_parts(torch.cat([prev[0], cur[0]]), torch.cat([prev[1], cur[1]]), both, 1)
                    if last_group[b] == gi:
                        y_sum[b] += net.readout(cur[1], sizes[b : b + 1])[0].cpu().numpy()
                        lse_final[b] = cur[0][0].cpu()
                    else:
                        pending[b] = cur
                if attention:
                    logit_parts.append(logits.cpu())
                    bag_parts.append(torch.as_tensor(bag_ids)[batch.pooled_bag.cpu()])
                    row_parts.append(batch.cell[batch.pool].cpu())
                bar.update()
        if attention:
            bag_of = torch.cat(bag_parts)
            att = torch.exp(torch.cat(logit_parts) - lse_final[bag_of]).numpy()
            att_sum = att if att_sum is None else att_sum + att
            rows = torch.cat(row_parts).numpy()
    bar.close()
    y = y_sum / len(nets)
    return (y, rows, att_sum / len(nets)) if attention else (y, None, None)


def check_features(model_config: dict, cells: AnnData) -> None:
    """Raise when the cell table's features do not match those the model was trained on."""
    from bitro._utils import check_key

    key, dim = model_config["feature_key"], model_config["architecture"]["n_features"]
    check_key(cells.obsm, key, "Cell features .obsm")
    got = np.shape(cells.obsm[key])[1]
    if got != dim:
        msg = (
            f"The model was trained on {dim}-dimensional cell features .obsm[{key!r}], the cell table has {got}. "
            "Extract the features with the same encoder and PCA as the training data."
        )
        raise ValueError(msg)
    trained, here = model_config.get("encoder"), encoder_info(cells)
    if trained and here and trained != here:
        msg = f"The cell features were made with {here}, the model was trained on features made with {trained}."
        raise ValueError(msg)


def encoder_info(cells: AnnData) -> dict | None:
    """The feature extraction parameters recorded in the cell table's ``.uns`` (JSON-able), if any."""
    import json

    info = cells.uns.get(Key.UNS, {}).get("extract_cells")
    if info is None:
        return None
    return json.loads(json.dumps(info, default=str))


def predict(
    model: BitroModel,
    adata: AnnData | SpatialData,
    *,
    cells: AnnData | None = None,
    key_added: str = Key.PREDICTED,
    pseudo_cell_key: str = Key.PSEUDO_CELL,
    attention: bool = False,
    attention_key: str = Key.ATTENTION,
    tokens_per_batch: int = 8192,
) -> None:
    """Predict expression with a trained model and write it into ``adata`` and the cell table.

    Bags are built as in training: each spot's cells with their context (``target="spot"``), or all cells
    of each slide in chunks (``target="bulk"``, combined exactly, so any slide size fits in memory).

    Parameters
    ----------
    model
        A model from :func:`bitro.tl.fit` or :func:`bitro.tl.load_model`.
    adata
        The table to predict: spots (``.obs["sample"]``, ``.obs["spot_id"]``, ``.obsm["spatial"]``) for a
        spot model, slides (``.obs["sample"]``) for a bulk model; or a SpatialData holding it
        (``"spots"`` / ``"bulk"``) and the ``"cells"`` table. Its expression, if any, is not used.
    cells
        The cell table; default: the SpatialData's ``"cells"`` table.
    key_added
        Where predictions go in ``adata``.
    pseudo_cell_key
        Where pseudo-cell expression goes in the cell table's ``.obsm``.
    attention
        Also write each pooled cell's attention per gene.
    attention_key
        Where the attention goes in the cell table's ``.obsm``.
    tokens_per_batch
        Cells per forward pass (bounds memory).

    Returns
    -------
    Nothing; writes

    - ``adata.obsm[key_added]``: :class:`pandas.DataFrame` (rows x the model's genes) on the model's target
      scale; rows whose bag has no cell are NaN.
    - ``adata.layers[key_added]``: the same values aligned to ``adata.var_names`` (NaN for genes the model
      does not predict); only written when ``adata`` has at least one of the model's genes.
    - ``cells.obsm[pseudo_cell_key]``: :class:`pandas.DataFrame` (cells x genes), pseudo-cell expression
      ``A[g, i] * y[g]`` (attention share of cell ``i`` times its bag's prediction on the target scale; a bag's
      cells sum to its prediction). NaN for cells in no bag (e.g. outside every spot).
    - ``cells.obsm[attention_key]`` (with ``attention=True``): the attention ``A[g, i]``, NaN outside bags.
    - ``.uns["bitro"]["predict"]`` on both tables: the parameters.

    Examples
    --------
    >>> bt.tl.predict(model, sdata)  # doctest: +SKIP
    >>> sdata["spots"].obsm["bitro_predicted"]["ERBB2"]  # doctest: +SKIP
    """
    from bitro.tl._bags import bulk_bags, cell_data, spot_bags

    table, cells = resolve_tables(model.target, adata, cells)
    check_features(model.config, cells)
    if tokens_per_batch < 1:
        msg = f"tokens_per_batch must be positive, got {tokens_per_batch}."
        raise ValueError(msg)
    data = cell_data(cells, feature_key=model.config["feature_key"])
    bag_cfg = model.config["bags"]
    if model.target == "spot":
        bags = spot_bags(table, data, context_radius=bag_cfg["context_radius"], max_context=bag_cfg["max_context"])
    else:
        bags = bulk_bags(table, data, chunk_size=bag_cfg["chunk_size"])
    keep = np.array([b is not None for b in bags])
    kept = [b for b in bags if b is not None]
    y, rows, att = predict_bags(
        model.nets, kept, data, tokens_per_batch=tokens_per_batch, attention=True, desc="predict"
    )
    genes = model.genes
    y = model.zscore.inverse(y)
    pred = np.full((table.n_obs, len(genes)), np.nan, dtype=np.float32)
    pred[keep] = y
    # pseudo-cells: attention share x the bag's prediction on the target scale
    owner = np.full(cells.n_obs, -1)
    for j, bag in enumerate(kept):
        for s in bag:
            owner[s.cells[: s.n_pool]] = j
    pseudo = np.full((cells.n_obs, len(genes)), np.nan, dtype=np.float32)
    pseudo[rows] = att * y[owner[rows]]
    table.obsm[key_added] = pd.DataFrame(pred, index=table.obs_names, columns=genes)
    present = [g for g in genes if g in table.var_names]
    if present:
        layer = np.full(table.shape, np.nan, dtype=np.float32)
        layer[:, table.var_names.get_indexer(present)] = pred[:, [genes.index(g) for g in present]]
        table.layers[key_added] = layer
    cells.obsm[pseudo_cell_key] = pd.DataFrame(pseudo, index=cells.obs_names, columns=genes)
    if attention:
        full = np.full((cells.n_obs, len(genes)), np.nan, dtype=np.float32)
        full[rows] = att
        cells.obsm[attention_key] = pd.DataFrame(full, index=cells.obs_names, columns=genes)
    params = {
        "target": model.target,
        "scale": model.scale,
        "key_added": key_added,
        "pseudo_cell_key": pseudo_cell_key,
        "attention_key": attention_key if attention else None,
        "n_predicted": int(keep.sum()),
        "n_genes": len(genes),
    }
    for t in (table, cells):
        t.uns.setdefault(Key.UNS, {})["predict"] = params
    logger.info(f"Predicted {len(genes)} genes for {int(keep.sum())} of {table.n_obs} {model.target} rows.")
