"""Transfer learning between the bulk and spot levels: :func:`transfer`.

The fine-tuned model and its LoRA adapters are in :mod:`bitro.tl._adapters`; training goes through the one loop of
:mod:`bitro.tl._train`.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Literal

from anndata import AnnData

from bitro._checks import check_int, check_number
from bitro._constants import Key
from bitro._deprecate import renamed_args
from bitro._logging import logger
from bitro._utils import resolve_device
from bitro.tl._adapters import TransferredModel
from bitro.tl._config import TARGETS
from bitro.tl._persist import BitroModel
from bitro.tl._train import check_validation

if TYPE_CHECKING:
    from spatialdata import SpatialData

METHODS: tuple[str, ...] = ("lora", "full")
#: Default learning rates (``lr=None``) of LoRA, by target level, and of full fine-tuning. Measured on the synthetic
#: map (``docs/benchmarks.md``, "When does transfer pay off?"): towards spots the adapters need larger steps (5e-3
#: kept more of full fine-tuning's gain than 1e-3); towards bulk, with a few bulk profiles, 5e-3 overfits and 1e-3
#: gained most.
DEFAULT_LORA_LR: dict[str, float] = {"spot": 5e-3, "bulk": 1e-3}
DEFAULT_FULL_LR: float = 1e-3
TRAIN_GENES: tuple[str, ...] = ("all", "new")


# -- transfer ----------------------------------------------------------------------------------------------
def _check_params(p: dict[str, Any]) -> None:
    if p["target"] not in TARGETS:
        msg = f"target={p['target']!r} is not supported; use one of {TARGETS}."
        raise ValueError(msg)
    if p["method"] not in METHODS:
        msg = f"method={p['method']!r} is not supported; use one of {METHODS}."
        raise ValueError(msg)
    if p["train_genes"] not in TRAIN_GENES:
        msg = f"train_genes={p['train_genes']!r} is not supported; use one of {TRAIN_GENES}."
        raise ValueError(msg)
    if p["train_genes"] == "new" and p["method"] == "full":
        msg = "train_genes='new' freezes the carried genes of a LoRA fine-tuning; method='full' trains every weight."
        raise ValueError(msg)
    if p["train_genes"] == "new" and p["weight_decay"] > 0:
        msg = (
            "train_genes='new' keeps the carried genes' rows fixed, which weight decay would move; set weight_decay=0."
        )
        raise ValueError(msg)
    for name in ("rank", "epochs", "batch_size"):
        check_int(name, p[name], minimum=1)
    check_int("patience", p["patience"], minimum=0)
    if "seed" in p:
        check_int("seed", p["seed"], minimum=0)
    check_number("alpha", p["alpha"], low=0, low_open=True)
    check_number("lr", p["lr"], low=0, low_open=True, hint="Adam learning rates are about 1e-4 to 1e-2.")
    for name in ("weight_decay", "cluster_weight"):
        if p[name] is not None:
            check_number(name, p[name], low=0)
    for name in ("dropout", "cell_dropout"):
        check_number(name, p[name], low=0, high=1, high_open=True)
    check_validation(p["validation"])


@renamed_args(adata="data")
def transfer(
    model: BitroModel,
    data: AnnData | SpatialData,
    target: Literal["spot", "bulk"] = "spot",
    *,
    cells: AnnData | None = None,
    table_key: str | None = None,
    cells_key: str = Key.CELLS_TABLE,
    graph_key: str = Key.GRAPH,
    phenotype_key: str = Key.PHENOTYPE,
    method: Literal["lora", "full"] = "lora",
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.05,
    target_modules: list[str] | None = None,
    genes: list[str] | None = None,
    train_genes: Literal["all", "new"] = "all",
    center_samples: bool | None = None,
    validation: Literal["sample"] | float | None = "sample",
    epochs: int = 50,
    patience: int = 6,
    lr: float | None = None,
    weight_decay: float = 0.0,
    batch_size: int = 32,
    cell_dropout: float = 0.1,
    cluster_weight: float | None = None,
    seed: int = 0,
    device: str | None = None,
) -> TransferredModel:
    """Fine-tune a trained model on the other level: bulk -> spot or spot -> bulk (BiTro's transfer learning).

    Every weight of ``model`` is the starting point. With ``method="lora"`` its shared layers stay frozen and
    low-rank adapters (:mod:`peft` LoRA) on ``target_modules`` are trained; ``method="full"`` fine-tunes every
    weight. The gene head is trained with ``train_genes="all"``: the target level has its own normalisation, so each
    gene's output is re-calibrated. With a gene space (``gene_rank``, the default of :func:`bitro.tl.fit`) that head
    is small: the low-rank factors of the gene queries and output weights, and each gene's bias and bag-size term
    (the gene basis stays fixed); without one it is every gene's query and output row (or the shared readout MLP).
    Genes are matched by symbol: a gene of both keeps its query and readout, a gene new to the target starts
    fresh (and is always trained), a gene absent from the target is dropped. The target's z-score statistics
    replace the source's. Data preparation, the training loop, the validation split (from the target's training
    samples) and early stopping are those of :func:`bitro.tl.fit`.

    Parameters
    ----------
    model
        The source model (:func:`bitro.tl.fit`, :func:`bitro.tl.load_model` or a previous transfer); not changed.
    data
        The target-level training data with raw counts: a spot table for ``target="spot"``, a bulk table
        (one row per slide, or region rows from :func:`bitro.tl.pseudobulk`) for ``target="bulk"``; or a
        SpatialData holding it and the cell table.
    target
        ``"spot"`` or ``"bulk"``.
    cells
        The cell table, with features made like the source model's, when ``data`` is an AnnData.
    table_key
        The expression table of a SpatialData; default ``"spots"`` (``target="spot"``) or ``"bulk"``.
    cells_key
        The cell table of a SpatialData.
    graph_key
        The cell graph, as ``bt.pp.spatial_graph(key_added=...)`` wrote it.
    phenotype_key
        The cell phenotypes column, as ``bt.pp.phenotypes(key_added=...)`` wrote it.
    method
        ``"lora"`` (adapters, base frozen) or ``"full"`` (every weight trained).
    rank
        LoRA rank.
    alpha
        LoRA scaling numerator (the update is scaled by ``alpha / rank``).
    dropout
        Dropout on the LoRA branch input.
    target_modules
        Layers that get adapters (names or name suffixes of :class:`torch.nn.Linear` layers); default: the model's
        own choice; for BiTro the attention query and value projections and, towards spots, the cell features'
        input projection: ``["in_proj", "q", "v"]`` towards spots, ``["q", "v"]`` towards bulk (the others: ``"k"``,
        ``"o"``, ``"ff1"``, ``"ff2"``); measured in ``docs/benchmarks.md``, "When does transfer pay off?".
    genes
        Genes to predict; default: the source model's genes found in ``data``.
    train_genes
        ``"all"``: train the head of every gene; ``"new"``: only genes new to the target (carried genes and the
        shared readout keep the source's weights; needs ``weight_decay=0``).
    center_samples
        Center each target sample's rows on the overall mean profile, as in :func:`bitro.tl.fit`; default
        ``True`` for ``target="spot"``, ``False`` for ``target="bulk"``.
    validation
        Early-stopping split from the target data, as in :func:`bitro.tl.fit`.
    epochs
        Most epochs.
    patience
        Epochs without improvement of the validation score before stopping.
    lr
        Adam learning rate; default with ``method="lora"`` 5e-3 towards spots and 1e-3 towards bulk, with
        ``"full"`` 1e-3; measured in ``docs/benchmarks.md``, "When does transfer pay off?".
    weight_decay
        Adam weight decay on the trained parameters.
    batch_size
        Bags per step.
    cell_dropout
        Training: probability of dropping each cell from its bag in a step.
    cluster_weight
        Weight of the cluster loss; default: the source model's.
    seed
        Random seed (adapter initialisation, new genes, splits, batches); ensemble member ``k`` uses ``seed + k``.
    device
        Torch device; default ``bitro.settings.device``.

    Returns
    -------
    The fine-tuned :class:`~bitro.tl.TransferredModel` (``target`` level, its genes and statistics).

    Examples
    --------
    >>> bulk_model = bt.tl.fit(bulk, target="bulk", cells=cells)  # doctest: +SKIP
    >>> spot_model = bt.tl.transfer(bulk_model, spots, target="spot", cells=cells)  # doctest: +SKIP
    >>> spot_model.save_adapters("adapters")  # doctest: +SKIP
    """
    params = {k: v for k, v in locals().items() if k not in ("model", "data", "cells", "genes")}
    import torch

    from bitro.tl._adapters import add_lora, carry_genes, count_trained, merged_net, model_fingerprint
    from bitro.tl._bags import (
        bag_embeddings,
        cell_data,
        check_features,
        log_cell_count,
        make_bags,
        pooled_radius,
        resolve_tables,
    )
    from bitro.tl._targets import check_table, select_genes, training_targets
    from bitro.tl._train import TrainOptions, split, train_ensemble

    if not isinstance(model, BitroModel) or not model.nets:
        msg = f"`model` must be a trained BitroModel (from `bt.tl.fit` or `bt.tl.load_model`), got {type(model).__name__}."
        raise TypeError(msg)
    source_arch = model.config.architecture
    cluster_weight = getattr(source_arch, "cluster_weight", 0.0) if cluster_weight is None else cluster_weight
    params["cluster_weight"] = cluster_weight
    lora_default = getattr(model.nets[0], "lora_targets", ())
    if isinstance(lora_default, dict):  # a choice by target level
        lora_default = lora_default.get(target, ())
    params["target_modules"] = list(lora_default if target_modules is None else target_modules)
    if params["lr"] is None:
        params["lr"] = DEFAULT_LORA_LR.get(target, DEFAULT_FULL_LR) if method == "lora" else DEFAULT_FULL_LR
    _check_params(params)
    table, cells = resolve_tables(data, target, cells=cells, table_key=table_key, cells_key=cells_key)
    counts = check_table(table, target)
    check_features(model.config, model.cell_reference, cells)

    source_genes = model.genes
    if genes is None:
        names = set(map(str, table.var_names))
        genes = [g for g in source_genes if g in names]
    else:
        genes = select_genes(counts[:1], table.var_names, genes=genes, n_top_genes=1)
    shared = set(genes) & set(source_genes)
    if not shared:
        msg = (
            f"The source model's genes and the target data share no gene symbol (model: {source_genes[:5]}, "
            f"target: {list(map(str, table.var_names[:5]))}). Transfer carries genes over by symbol: use the same "
            "gene naming (symbols, not Ensembl ids) in both."
        )
        raise ValueError(msg)
    n_new = sum(g not in set(source_genes) for g in genes)
    n_dropped = sum(g not in set(genes) for g in source_genes)

    settings = copy.deepcopy(model.config.bags)
    data_cells = cell_data(
        cells,
        use_rep=model.config.feature_key,
        graph_key=graph_key,
        phenotype_key=phenotype_key,
        need_phenotype=cluster_weight > 0,
    )
    tokens = bag_embeddings(model.config, table, data_cells, target=target)  # a spot model's fields of cells
    bags, keep = make_bags(table, data_cells, target, settings, for_what="fine-tune", embeddings=tokens)
    samples = table.obs[Key.SAMPLE].astype(str).to_numpy()[keep]
    center = target == "spot" if center_samples is None else center_samples
    genes, zscore, yz = training_targets(
        counts[keep], table.var_names, samples, scale=model.scale, genes=genes, n_top_genes=1, center=center
    )
    splits = [split(samples, validation, seed, k) for k in range(len(model.nets))]

    new_rows = torch.tensor([g not in set(source_genes) for g in genes])
    # the target's bag sizes replace the source's; the loss weight is this fine-tuning's
    target_arch = type(source_arch).for_data(
        n_features=source_arch.n_features, n_genes=len(genes), bag_sizes=[log_cell_count(b) for b in bags]
    )
    update = {f: getattr(target_arch, f) for f in ("size_mean", "size_std") if hasattr(target_arch, f)}
    if hasattr(source_arch, "cluster_weight"):
        update["cluster_weight"] = float(cluster_weight)
    if hasattr(source_arch, "retrieval_weight"):  # as bt.tl.fit: spot models retrieve (from these bags), bulk not
        update["retrieval_weight"] = float(target_arch.retrieval_weight) if target == "spot" else 0.0
    lora = {
        "rank": int(rank),
        "alpha": float(alpha),
        "dropout": float(dropout),
        "target_modules": params["target_modules"],
    }
    nets = []
    for k, src in enumerate(model.nets):
        net = carry_genes(merged_net(src).cpu(), source_genes, genes, seed=seed + k, **update)
        if hasattr(net, "fill_gene_basis"):  # a gene space (gene_rank): new genes get rows in it from the targets
            net.fill_gene_basis(torch.as_tensor(yz, dtype=torch.float32), new_rows)
        if hasattr(net, "set_bank"):  # retrieval from this member's training bags of the new level
            net.set_bank(torch.as_tensor(yz[splits[k][0]], dtype=torch.float32))
        if method == "lora":
            add_lora(net, lora, train_genes=train_genes, new_rows=new_rows, seed=seed + k)
        nets.append(net)
    gene_params = nets[0].gene_params
    n_trained, n_total = count_trained(nets[0], train_genes, new_rows)
    logger.info(
        f"Transfer {model.target} -> {target} ({method}): {len(shared)} genes carried over, {n_new} new, {n_dropped} dropped; "
        f"training {n_trained} of {n_total} parameters ({100 * n_trained / n_total:.1f}%) on {len(bags)} bags."
    )
    options = TrainOptions.from_params({**params, "max_cells": int(model.config.training.get("max_cells", 2048))})
    dev = resolve_device(device)
    hooks = []
    if method == "lora" and train_genes == "new":  # only the rows of new genes move
        for net in nets:
            for name, p in net.named_parameters():
                if name in gene_params and p.requires_grad:
                    mask = new_rows.to(p.dtype).view(-1, *([1] * (p.dim() - 1))).to(dev)
                    hooks.append(p.register_hook(lambda g, m=mask: g * m))
    try:
        trained, histories, members = train_ensemble(
            lambda k: nets[k],
            bags,
            yz,
            data_cells,
            samples,
            splits,
            options=options,
            seed=seed,
            epochs=epochs,
            device=dev,
            desc="transfer",
            prepare=False,
        )
    finally:
        for h in hooks:
            h.remove()

    config = copy.deepcopy(model.config)
    settings.spot_radius = pooled_radius(bags, data_cells) if target == "spot" else None
    config.target = target
    config.genes = list(genes)
    config.zscore_mean = zscore.mean.tolist()
    config.zscore_std = zscore.std.tolist()
    config.architecture = trained[0].arch
    config.training = params
    config.training_samples = sorted(set(samples))
    config.members = members
    config.bags = settings
    config.gene_scores = config.gene_scores_protocol = None  # scores of the source level do not hold here
    config.transfer = {
        "source_target": model.target,
        "base_fingerprint": model_fingerprint(model),
        "method": method,
        "lora": lora if method == "lora" else None,
        "train_genes": train_genes,
        "genes_carried": len(shared),
        "genes_new": n_new,
        "genes_dropped": n_dropped,
        "n_parameters": n_total,
        "n_trained": n_trained,
        "merged": False,
    }
    return TransferredModel(trained, config, histories, model.cell_reference)
