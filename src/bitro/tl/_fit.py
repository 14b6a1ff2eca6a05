"""Training: :func:`fit`."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from anndata import AnnData

from bitro._checks import TrainingDivergedError
from bitro._constants import Key
from bitro._logging import logger
from bitro._settings import settings
from bitro._utils import check_key, release_memory, resolve_device
from bitro.tl._metrics import pcc_gene
from bitro.tl._targets import check_counts, check_scale, dense, select_genes, standardise_targets, to_scale

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from bitro.tl._bags import CellData, Seq
    from bitro.tl._model import BitroNet
    from bitro.tl._persist import BitroModel

TARGETS: tuple[str, ...] = ("spot", "bulk")
#: Fraction of the training samples that ``validation="sample"`` holds out (at least one).
VALIDATION_SAMPLE_FRACTION = 0.2


def resolve_tables(target: str, adata: AnnData | SpatialData, cells: AnnData | None) -> tuple[AnnData, AnnData]:
    """The expression table and the cell table, from an AnnData + ``cells`` or from a SpatialData."""
    if not isinstance(adata, AnnData):
        from spatialdata import SpatialData

        if not isinstance(adata, SpatialData):
            msg = f"`adata` must be an AnnData or a SpatialData, got {type(adata).__name__}."
            raise TypeError(msg)
        table_key = Key.SPOTS_TABLE if target == "spot" else Key.BULK_TABLE
        check_key(adata.tables, table_key, "Table")
        if cells is None:
            check_key(adata.tables, Key.CELLS_TABLE, "Cell table")
            cells = adata.tables[Key.CELLS_TABLE]
        adata = adata.tables[table_key]
    if cells is None:
        msg = "Give the cell table: `cells=` (an AnnData), or pass a SpatialData holding a 'cells' table."
        raise ValueError(msg)
    return adata, cells


def check_table(table: AnnData, target: str) -> None:
    """Raise when the spot / bulk table cannot be trained on: no rows, no genes or duplicated gene names."""
    from bitro._checks import check_unique_index

    if not isinstance(table, AnnData):
        msg = f"The {target} table must be an AnnData, got {type(table).__name__}."
        raise TypeError(msg)
    if table.n_obs == 0 or table.n_vars == 0:
        msg = f"The {target} table is empty ({table.n_obs} rows x {table.n_vars} genes); give rows with measured genes."
        raise ValueError(msg)
    check_unique_index(
        table.var_names,
        f"The {target} table's genes (.var_names)",
        "make them unique with `adata.var_names_make_unique()` or sum the duplicated genes first",
    )
    check_key(table.obs.columns, Key.SAMPLE, f"The {target} table's column .obs")


def check_validation(v: Any) -> None:
    """Check the ``validation`` argument of :func:`fit` and :func:`bitro.tl.transfer`."""
    if not (v is None or v == "sample" or (isinstance(v, float) and 0 < v < 1)):
        msg = f"validation={v!r}: use 'sample' (hold out training samples), a fraction in (0, 1) of the bags, or None."
        raise ValueError(msg)


#: Largest seed: seeds are combined with epochs and members into numpy and torch seeds.
MAX_SEED = 2**31 - 1


def check_bool(name: str, value: Any, *, allow_none: bool = False) -> None:
    """Raise unless ``value`` is ``True`` or ``False`` (or ``None`` when allowed)."""
    if not (isinstance(value, bool | np.bool_) or (allow_none and value is None)):
        msg = f"`{name}` must be True or False{' or None' if allow_none else ''}, got {value!r}."
        raise TypeError(msg)


def _check_params(**p: Any) -> None:
    """Types and ranges of :func:`fit`'s parameters, each failing with one sentence before any work."""
    from bitro._checks import check_int, check_number
    from bitro.tl._model import READOUTS

    if p["target"] not in TARGETS:
        msg = f"target={p['target']!r} is not supported; use one of {TARGETS}."
        raise ValueError(msg)
    check_scale(p["scale"])
    if p["readout"] not in READOUTS:
        msg = f"readout={p['readout']!r} is not supported; use one of {READOUTS}."
        raise ValueError(msg)
    check_validation(p["validation"])
    for name in ("epochs", "batch_size", "n_seeds", "dim", "chunk_size", "max_cells", "n_top_genes", "heads", "ff_dim"):
        check_int(name, p[name], minimum=1)
    for name in ("patience", "gat_layers", "transformer_layers", "max_context", "seed"):
        check_int(name, p[name], minimum=0)
    if p["seed"] + p["n_seeds"] > MAX_SEED:
        msg = f"`seed` + `n_seeds` must stay below {MAX_SEED}, got seed={p['seed']!r}; use a smaller seed."
        raise ValueError(msg)
    if p["dim"] % p["heads"]:
        msg = f"`dim` ({p['dim']}) must be divisible by `heads` ({p['heads']}); e.g. dim={p['heads'] * 16}."
        raise ValueError(msg)
    check_number("lr", p["lr"], low=0, low_open=True, hint="Adam learning rates are about 1e-4 to 1e-2.")
    for name in ("weight_decay", "cluster_weight", "context_radius"):
        check_number(name, p[name], low=0)
    for name in ("dropout", "cell_dropout"):
        check_number(name, p[name], low=0, high=1, high_open=True)
    for name in ("bag_size", "refit"):
        check_bool(name, p[name])
    check_bool("center_samples", p["center_samples"], allow_none=True)
    if not isinstance(p["feature_key"], str):
        msg = f"`feature_key` must be the name of the features in `cells.obsm`, got {p['feature_key']!r}."
        raise TypeError(msg)
    if p["device"] is not None and not isinstance(p["device"], str):
        msg = f"`device` must be a torch device name such as 'cpu' or 'cuda', got {p['device']!r}."
        raise TypeError(msg)


def _split(
    samples: np.ndarray, validation: str | float | None, seed: int, member: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation rows of ensemble member ``member``.

    ``validation="sample"``: the samples are shuffled once (by ``seed``) and member ``k`` holds out the
    ``k``-th block of them, so the members of an ensemble validate on different samples in turn and every
    training sample is trained on by most members. A fraction: random bags, drawn per member.
    """
    idx = np.arange(len(samples))
    if validation is None:
        return idx, idx[:0]
    rng = np.random.default_rng(seed if validation == "sample" else seed + member)
    if validation == "sample":
        uniq = np.array(sorted(set(samples)))
        if len(uniq) < 2:
            msg = (
                f"validation='sample' holds out a training sample for early stopping, but there is only {list(uniq)}. "
                "Use validation=0.2 (a random fifth of the bags) or validation=None (train for `epochs`)."
            )
            raise ValueError(msg)
        n_val = max(1, round(VALIDATION_SAMPLE_FRACTION * len(uniq)))
        order = rng.permutation(uniq)
        held = order[(member * n_val + np.arange(n_val)) % len(uniq)]
        val = np.isin(samples, held)
    else:
        val = np.zeros(len(samples), bool)
        val[rng.choice(len(samples), size=max(1, round(validation * len(samples))), replace=False)] = True
    if val.all():
        msg = "The validation split left no training data; use a smaller validation fraction."
        raise ValueError(msg)
    return idx[~val], idx[val]


#: Training stops with an error when an epoch's mean loss exceeds this many times the untrained network's loss.
DIVERGENCE_FACTOR = 10.0
#: The yardstick of :data:`DIVERGENCE_FACTOR` is at least this loss (z-scored targets start near 1).
DIVERGENCE_FLOOR = 0.1


def _diverged(what: str, lr: float) -> None:
    """Stop a diverging training run with one sentence (nothing is returned or written)."""
    msg = (
        f"Training diverged: {what}, so the model would predict nonsense; train again with a smaller learning rate "
        f"(lr={lr:g} now, try lr={lr / 10:g})."
    )
    raise TrainingDivergedError(msg)


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _train(
    arch,
    bags: list[list[Seq]],
    yz: np.ndarray,
    cells: CellData,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    *,
    hp: dict[str, Any],
    seed: int,
    epochs: int,
    device,
    folder: Path | None,
    desc: str,
    net: BitroNet | None = None,
):
    """Train one network; early stopping on ``val_idx`` when it is not empty. Returns ``(net, history)``.

    ``net``: train this network (e.g. with LoRA adapters, :func:`bitro.tl.transfer`) instead of a new one;
    only its parameters that require gradients are optimised.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from bitro.tl._bags import collate
    from bitro.tl._model import BitroNet, cluster_loss
    from bitro.tl._persist import load_checkpoint, save_checkpoint
    from bitro.tl._predict import predict_bags

    torch.manual_seed(seed)
    net = BitroNet(arch).to(device) if net is None else net.to(device)
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=hp["lr"], weight_decay=hp["weight_decay"])
    fingerprint = _fingerprint(
        arch.to_dict(), hp, seed, train_idx.tolist(), val_idx.tolist(), yz.shape, float(yz.sum())
    )
    history: dict[str, Any] = {k: [] for k in ("train_loss", "train_mse", "train_cluster", "val_mse", "val_pcc_gene")}
    state = {
        "epoch": 0,
        "best_score": None,
        "best_epoch": 0,
        "bad_epochs": 0,
        "stopped": False,
        "start_loss": None,
        "history": history,
    }
    best_state = None
    if folder is not None:
        restored = load_checkpoint(folder, net=net, optimizer=opt, fingerprint=fingerprint, epochs=epochs)
        if restored is not None:
            state, best_state = restored
            history = state["history"]
    monitor_pcc = len(val_idx) >= 3
    target = torch.as_tensor(yz, dtype=torch.float32)
    cw, bs = hp["cluster_weight"], hp["batch_size"]
    bar = tqdm(total=epochs, desc=desc, disable=not settings.progress, initial=state["epoch"])
    for epoch in range(state["epoch"], epochs):
        if state["stopped"]:
            break
        rng = np.random.default_rng([seed, epoch])
        torch.manual_seed(seed * 1_000_003 + epoch)
        net.train()
        order = rng.permutation(train_idx)
        sums = np.zeros(3)
        for i in range(0, len(order), bs):
            idx = order[i : i + bs]
            batch = collate(
                [bags[j] for j in idx], cells, rng=rng, cell_dropout=hp["cell_dropout"], max_cells=hp["max_cells"]
            ).to(device)
            y, _, cell_expr = net(batch)
            mse = F.mse_loss(y, target[idx].to(device))
            cl = cluster_loss(cell_expr, batch.phenotype[batch.pool]) if cw > 0 else y.new_zeros(())
            loss = mse + cw * cl
            if not torch.isfinite(loss):
                _diverged(f"the training loss became {loss.item()} in epoch {epoch + 1}", hp["lr"])
            if state.get("start_loss") is None:
                state["start_loss"] = float(loss.item())  # the untrained network's loss, the watchdog's yardstick
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sums += np.array([loss.item(), mse.item(), cl.item()]) * len(idx)
        for k, v in zip(("train_loss", "train_mse", "train_cluster"), sums / len(order), strict=True):
            history[k].append(float(v))
        if history["train_loss"][-1] > DIVERGENCE_FACTOR * max(state["start_loss"], DIVERGENCE_FLOOR):
            _diverged(
                f"the training loss rose to {history['train_loss'][-1]:.3g} in epoch {epoch + 1}, more than "
                f"{DIVERGENCE_FACTOR:g} times its start ({state['start_loss']:.3g})",
                hp["lr"],
            )
        post = {"loss": f"{history['train_loss'][-1]:.3f}"}
        if len(val_idx):
            pv, _, _ = predict_bags([net], [bags[j] for j in val_idx], cells)
            if not np.isfinite(pv).all():
                _diverged(f"the validation predictions are not finite after epoch {epoch + 1}", hp["lr"])
            v_mse, v_pcc = float(np.mean((pv - yz[val_idx]) ** 2)), pcc_gene(pv, yz[val_idx])
            history["val_mse"].append(v_mse)
            history["val_pcc_gene"].append(v_pcc)
            score = v_pcc if monitor_pcc else -v_mse
            post.update(val_mse=f"{v_mse:.3f}", val_pcc=f"{v_pcc:.3f}")
            if state["best_score"] is None or score > state["best_score"]:
                state.update(best_score=score, best_epoch=epoch + 1, bad_epochs=0)
                best_state = copy.deepcopy(net.state_dict())
            else:
                state["bad_epochs"] += 1
            state["stopped"] = state["bad_epochs"] >= hp["patience"]
        else:
            state["best_epoch"] = epoch + 1
        state["epoch"] = epoch + 1
        bar.set_postfix(post)
        bar.update()
        if folder is not None:
            save_checkpoint(
                folder, net=net, optimizer=opt, best_state=best_state, state=dict(state, fingerprint=fingerprint)
            )
    bar.close()
    if best_state is not None:
        net.load_state_dict(best_state)
    history["best_epoch"] = state["best_epoch"]
    release_memory()  # the training's temporaries, kept by the C allocator otherwise
    return net.eval(), history


def fit(
    adata: AnnData | SpatialData,
    target: Literal["spot", "bulk"] = "spot",
    *,
    cells: AnnData | None = None,
    genes: list[str] | None = None,
    n_top_genes: int = 250,
    scale: Literal["cp10k", "log1p"] = "cp10k",
    center_samples: bool | None = None,
    validation: Literal["sample"] | float | None = "sample",
    feature_key: str = Key.FEATURES,
    context_radius: float = 150.0,
    max_context: int = 64,
    chunk_size: int = 256,
    max_cells: int = 2048,
    dim: int = 64,
    gat_layers: int = 1,
    transformer_layers: int = 1,
    heads: int = 4,
    ff_dim: int = 128,
    readout: Literal["gene", "shared", "cell"] = "cell",
    bag_size: bool = True,
    dropout: float = 0.1,
    cell_dropout: float = 0.1,
    cluster_weight: float = 0.1,
    epochs: int = 100,
    patience: int = 6,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 32,
    seed: int = 0,
    n_seeds: int = 3,
    refit: bool = False,
    checkpoint_dir: str | Path | None = None,
    device: str | None = None,
) -> BitroModel:
    """Train a BiTro model on spot or bulk expression.

    Each row of ``adata`` is a *bag* of cells: the cells inside a spot (plus the cells around it as context,
    ``target="spot"``) or all cells of a slide (``target="bulk"``). The network (GAT on the cell kNN graph,
    Transformer with position embeddings in micrometres, gene-query attention pooling, readout) predicts
    the bag's gene-wise z-scored expression; the loss is the MSE plus ``cluster_weight`` times the paper's
    cluster loss on pseudo-cell expression within phenotypes. Adam, gradient norm clipped to 1, early stopping
    on a validation split drawn from the training data (never from data to be predicted).

    Parameters
    ----------
    adata
        The expression to learn from, with raw counts (or TPM for bulk) in ``.X``: the spot table
        (``.obs["sample"]``, ``.obs["spot_id"]``, ``.obsm["spatial"]``) for ``target="spot"``, or a bulk table
        (``.obs["sample"]`` naming each slide's section) for ``target="bulk"``. Or a SpatialData: its
        ``"spots"`` / ``"bulk"`` table and its ``"cells"`` table are used. Every row is training data.
    target
        ``"spot"`` or ``"bulk"``.
    cells
        The cell table (from ``bt.pp``): ``.obsm["X_bitro"]``, ``.obsm["spatial"]``, ``.obs["sample"]``,
        ``.obs["spot_id"]``, ``.obs["phenotype"]``, ``.obsp["spatial_connectivities"]`` and
        ``.uns["bitro"]["pixel_size"]``. Default: the SpatialData's ``"cells"`` table.
    genes
        Genes to predict; default: the ``n_top_genes`` most variable genes (on the target scale, over the
        training rows).
    n_top_genes
        Number of genes when ``genes`` is not given.
    scale
        Target scale: ``"cp10k"`` (log1p of counts per 10,000) or ``"log1p"`` (log1p of raw counts).
        Targets are z-scored per gene with statistics of the training rows, stored with the model.
    center_samples
        Centre each training sample's rows on the overall mean profile before the z-scores, so the model
        learns the variation within samples (between spots of a section) and not the differences between
        the samples' mean profiles (batch effects that morphology of a new section cannot predict).
        Default: ``True`` for ``target="spot"``, ``False`` for ``target="bulk"`` (one row per sample).
    validation
        Early-stopping split, from the training data: ``"sample"`` holds out whole samples (20% of them, at
        least one; chosen by the seed), a float holds out that fraction of the bags at random, ``None``
        trains for ``epochs`` epochs without early stopping. The monitored score is the validation
        PCC_gene (the validation MSE when there are fewer than 3 validation bags).
    feature_key
        Cell features in ``cells.obsm``.
    context_radius
        Cells within this distance (micrometres) of a spot centre join its bag as context (attended to by
        the Transformer, not pooled). 0 switches context off.
    max_context
        Most context cells per spot (subsampled evenly along the distance to the centre).
    chunk_size
        Bulk: cells per chunk (Transformer sequence) of a slide.
    max_cells
        Bulk: most cells per slide and training step (random chunks).
    dim
        Embedding width.
    gat_layers
        GAT layers (0: none).
    transformer_layers
        Transformer layers (0: none).
    heads
        Attention heads of the GAT and Transformer layers.
    ff_dim
        Width of the Transformer feed-forward layer.
    readout
        ``"cell"`` (default): a per-gene linear output applied to each cell's own embedding, the bag's prediction
        being the attention-weighted mean of its cells' plus the bag-size term (cell values carry each cell's own
        information and do not depend on how many cells share its bag; see :func:`bitro.tl.predict`). ``"gene"``: a linear output per gene on the pooled embedding, cells getting the
        paper's attention shares (Eq. 10); ``"shared"``: the paper's MLP shared by all genes. Measured
        (``docs/benchmarks.md``): ``"cell"`` scores HER2ST leave-one-section-out PCC_gene 0.134 against 0.124 for
        ``"gene"``, and on synthetic slides its cells beat an equal split of each spot's prediction, which the
        attention shares do not.
    bag_size
        Give the readout each bag's cell count (standardised log): attention pooling is a weighted mean
        and cannot see how many cells a spot holds, which drives its library size and composition.
    dropout
        Dropout in the network.
    cell_dropout
        Training: probability of dropping each cell from its bag in a step.
    cluster_weight
        Weight of the cluster loss (0 switches it off; then ``.obs["phenotype"]`` is not needed).
    epochs
        Most training epochs.
    patience
        Epochs without improvement of the validation score before stopping.
    lr
        Adam learning rate.
    weight_decay
        Adam weight decay.
    batch_size
        Bags per step.
    seed
        Random seed; the same seed gives the same model.
    n_seeds
        Ensemble size: networks trained with seeds ``seed, seed + 1, ...``; predictions are their mean. With
        ``validation="sample"`` the members hold out different training samples in turn (with 3 training
        sections and 3 members, each section validates one member and trains the other two).
    refit
        After early stopping, train again on all the training data (validation included) for the chosen
        number of epochs.
    checkpoint_dir
        Folder for per-epoch checkpoints; an interrupted fit called again with the same data, parameters
        and folder resumes from the last complete epoch.
    device
        Torch device; default ``bitro.settings.device``.

    Returns
    -------
    The trained :class:`~bitro.tl.BitroModel`; its ``history`` holds the training curves.

    Examples
    --------
    >>> model = bt.tl.fit(sdata, target="spot")  # doctest: +SKIP
    >>> bt.tl.predict(model, new_sdata)  # doctest: +SKIP
    """
    params = {k: v for k, v in locals().items() if k not in ("adata", "cells", "genes")}
    from bitro._checks import check_names
    from bitro.tl._bags import (
        bulk_bags,
        cell_data,
        check_cells_match_spots,
        log_cell_count,
        pooled_radius,
        size_stats,
        spot_bags,
    )
    from bitro.tl._model import Architecture
    from bitro.tl._persist import FORMAT_VERSION, BitroModel, cell_reference
    from bitro.tl._predict import feature_config

    params["checkpoint_dir"] = None if checkpoint_dir is None else str(checkpoint_dir)
    _check_params(**params)
    if genes is not None:
        genes = check_names("genes", genes)
    table, cells = resolve_tables(target, adata, cells)
    check_table(table, target)
    counts = dense(table.X)
    check_counts(counts, f"The {target} expression (.X)")
    data = cell_data(cells, feature_key=feature_key, need_phenotype=cluster_weight > 0)
    features = feature_config(cells, feature_key)
    if target == "spot":
        check_cells_match_spots(table, data)
        all_bags = spot_bags(table, data, context_radius=context_radius, max_context=max_context)
    else:
        all_bags = bulk_bags(table, data, chunk_size=chunk_size)
    keep = np.array([b is not None for b in all_bags])
    if keep.sum() < 2:
        msg = f"Only {int(keep.sum())} {target} rows have cells; at least 2 are needed to train."
        raise ValueError(msg)
    bags = [b for b in all_bags if b is not None]
    values = to_scale(counts[keep], scale)
    chosen = select_genes(values, table.var_names, genes=genes, n_top_genes=n_top_genes)
    y = values[:, table.var_names.get_indexer(chosen)]
    samples = table.obs[Key.SAMPLE].astype(str).to_numpy()[keep]
    center = target == "spot" if center_samples is None else center_samples
    zscore, yz = standardise_targets(y, samples, center_samples=center)
    splits = [_split(samples, validation, seed, k) for k in range(n_seeds)]  # raises before any training

    arch = Architecture(
        n_features=data.n_features,
        n_genes=len(chosen),
        dim=dim,
        gat_layers=gat_layers,
        gat_heads=heads,
        transformer_layers=transformer_layers,
        transformer_heads=heads,
        ff_dim=ff_dim,
        dropout=dropout,
        readout=readout,
        bag_size=bag_size,
        **size_stats([log_cell_count(b) for b in bags]),
    )
    hp = {
        k: params[k]
        for k in ("lr", "weight_decay", "batch_size", "cell_dropout", "cluster_weight", "patience", "max_cells")
    }
    dev = resolve_device(device)
    logger.info(
        f"Training on {len(bags)} {target} bags, {len(chosen)} genes, {data.features.shape[0]} cells, device {dev}."
    )
    nets, histories, members = [], [], []
    for k in range(n_seeds):
        s = seed + k
        train_idx, val_idx = splits[k]
        folder = None if checkpoint_dir is None else Path(checkpoint_dir) / f"member{k}"
        net, hist = _train(
            arch,
            bags,
            yz,
            data,
            train_idx,
            val_idx,
            hp=hp,
            seed=s,
            epochs=epochs,
            device=dev,
            folder=folder,
            desc=f"fit seed {s}",
        )
        members.append({"seed": s, "validation_samples": sorted(set(samples[val_idx]))})
        if refit and len(val_idx):
            all_idx = np.arange(len(bags))
            net, refit_hist = _train(
                arch,
                bags,
                yz,
                data,
                all_idx,
                all_idx[:0],
                hp=hp,
                seed=s,
                epochs=max(1, hist["best_epoch"]),
                device=dev,
                folder=None if folder is None else folder / "refit",
                desc=f"refit seed {s}",
            )
            hist.update({f"refit_{k}": v for k, v in refit_hist.items() if k.startswith("train_")})
        nets.append(net)
        histories.append(hist)
    config = {
        "format_version": FORMAT_VERSION,
        "target": target,
        "scale": scale,
        "genes": chosen,
        "zscore_mean": zscore.mean.tolist(),
        "zscore_std": zscore.std.tolist(),
        "feature_key": feature_key,
        "features": features,
        "architecture": arch.to_dict(),
        "bags": {
            "context_radius": context_radius,
            "max_context": max_context,
            "chunk_size": chunk_size,
            "spot_radius": pooled_radius(bags, data) if target == "spot" else None,
        },
        "training": params,
        "training_samples": sorted(set(samples)),
        "members": members,
    }
    return BitroModel(nets, config, histories, cell_reference(cells))
