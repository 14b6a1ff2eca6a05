"""Training: :func:`fit` checks its arguments, builds the bags and targets, and trains the chosen model."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from anndata import AnnData

from bitro._checks import check_bool, check_int, check_names, check_number
from bitro._constants import Key
from bitro._deprecate import renamed_args
from bitro._features import PATCH_LAYOUT, record_of
from bitro._logging import logger
from bitro._utils import resolve_device
from bitro.tl._config import TARGETS
from bitro.tl._targets import check_scale
from bitro.tl._train import check_validation
from bitro.tl.models import DEFAULT_MODEL, get_model

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from bitro.tl._persist import BitroModel

#: Largest seed: seeds are combined with epochs and members into numpy and torch seeds.
MAX_SEED = 2**31 - 1


def check_keys(**keys: Any) -> None:
    """Raise unless every ``*_key`` argument is a string (the name of a table, column or matrix)."""
    for name, value in keys.items():
        if not isinstance(value, str):
            msg = f"`{name}` must be a name (a string), got {value!r}."
            raise TypeError(msg)


def _check_params(p: dict[str, Any]) -> None:
    """Types and ranges of :func:`fit`'s own parameters, each failing with one sentence before any work."""
    if p["target"] not in TARGETS:
        msg = f"target={p['target']!r} is not supported; use one of {TARGETS}."
        raise ValueError(msg)
    check_scale(p["scale"])
    check_validation(p["validation"])
    for name in ("epochs", "batch_size", "n_members", "chunk_size", "max_cells", "n_top_genes"):
        check_int(name, p[name], minimum=1)
    for name in ("patience", "max_context", "seed"):
        check_int(name, p[name], minimum=0)
    if p["seed"] + p["n_members"] > MAX_SEED:
        msg = f"`seed` + `n_members` must stay below {MAX_SEED}, got seed={p['seed']!r}; use a smaller seed."
        raise ValueError(msg)
    check_number("lr", p["lr"], low=0, low_open=True, hint="Adam learning rates are about 1e-4 to 1e-2.")
    for name in ("weight_decay", "context_radius"):
        check_number(name, p[name], low=0)
    check_number("cell_dropout", p["cell_dropout"], low=0, high=1, high_open=True)
    check_bool("refit", p["refit"])
    check_bool("center_samples", p["center_samples"], allow_none=True)
    check_keys(**{k: p[k] for k in ("graph_key", "phenotype_key")})
    check_keys(**{k: p[k] for k in ("table_key", "cells_key", "use_rep", "aux_key", "patch_key") if p[k] is not None})
    if p["device"] is not None and not isinstance(p["device"], str):
        msg = f"`device` must be a torch device name such as 'cpu' or 'cuda', got {p['device']!r}."
        raise TypeError(msg)


@renamed_args(adata="data", n_seeds="n_members", feature_key="use_rep")
def fit(
    data: AnnData | SpatialData,
    target: Literal["spot", "bulk"] = "spot",
    *,
    model: str = DEFAULT_MODEL,
    cells: AnnData | None = None,
    table_key: str | None = None,
    cells_key: str | None = None,
    use_rep: str | None = None,
    graph_key: str = Key.GRAPH,
    phenotype_key: str = Key.PHENOTYPE,
    genes: list[str] | None = None,
    n_top_genes: int = 250,
    scale: Literal["cp10k", "log1p", "hist2st"] = "cp10k",
    center_samples: bool | None = None,
    validation: Literal["sample"] | float | None = "sample",
    context_radius: float = 150.0,
    max_context: int = 64,
    chunk_size: int = 256,
    max_cells: int = 2048,
    cell_dropout: float = 0.1,
    epochs: int = 100,
    patience: int = 6,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 32,
    seed: int = 0,
    n_members: int = 3,
    gene_reference: AnnData | None = None,
    aux_key: str | None = None,
    patch_key: str | None = None,
    refit: bool = False,
    checkpoint_dir: str | Path | None = None,
    device: str | None = None,
    **model_options: Any,
) -> BitroModel:
    """Train a model (BiTro by default) on spot or bulk expression.

    Each row of the expression table is a *bag* of cells: the cells inside a spot (plus the cells around it as
    context, ``target="spot"``) or all cells of a slide (``target="bulk"``). The BiTro network (optionally GAT on the
    cell kNN graph, Transformer with position embeddings in micrometres, gene-query attention pooling, readout) predicts the
    bag's gene-wise z-scored expression; the loss is the MSE plus ``cluster_weight`` times the paper's cluster loss
    on the cells' expression within phenotypes. Adam, gradient norm clipped to 1, early stopping on a validation
    split drawn from the training data (never from data to be predicted).

    Parameters
    ----------
    data
        The expression to learn from, with raw counts (or TPM for bulk) in ``.X``: the spot table
        (``.obs["sample"]``, ``.obs["spot_id"]``, ``.obsm["spatial"]``) for ``target="spot"``, or a bulk table
        (``.obs["sample"]`` naming each slide's section) for ``target="bulk"``, with the cell table as ``cells=``.
        Or a SpatialData holding both. Every row is training data.
    target
        ``"spot"`` or ``"bulk"``.
    model
        The model to train, by its registered name (:mod:`bitro.tl.models`): ``"bitro"`` (reads cells),
        ``"m2ort"`` or ``"cmrcnet"`` (read spot patches, ``bt.pp.spot_patches``; spot targets only).
    cells
        The cell table (from ``bt.pp``), when ``data`` is an AnnData: features ``.obsm[use_rep]``, centroids
        ``.obsm["spatial"]``, ``.obs["sample"]``, ``.obs["spot_id"]``, ``.obs[phenotype_key]``, the kNN graph
        ``.obsp[f"{graph_key}_connectivities"]`` and ``.uns["bitro"]["pixel_size"]``. For the patch models, the
        patch table of ``bt.pp.spot_patches`` instead (its tokens take the cells' place).
    table_key
        The expression table of a SpatialData; default ``"spots"`` (``target="spot"``) or ``"bulk"``.
    cells_key
        The cell table of a SpatialData; default ``"cells"``, or ``"patches"`` for the patch models.
    use_rep
        Token features in the cell (or patch) table's ``.obsm``; default ``"X_bitro"`` (as ``bt.pp.extract_cells``
        writes them), or ``"bitro_patches"`` for the patch models.
    graph_key
        The cell graph, as ``bt.pp.spatial_graph(key_added=...)`` wrote it.
    phenotype_key
        The cell phenotypes column, as ``bt.pp.phenotypes(key_added=...)`` wrote it (read by the cluster loss).
    genes
        Genes to predict; default: the ``n_top_genes`` most variable genes (on the target scale, over the
        training rows).
    n_top_genes
        Number of genes when ``genes`` is not given.
    scale
        Target scale: ``"cp10k"`` (log1p of counts per 10,000), ``"log1p"`` (log1p of raw counts) or ``"hist2st"``
        (log1p of counts per 10,000 of the predicted genes only, as Hist2ST normalises).
        Targets are z-scored per gene with statistics of the training rows, stored with the model.
    center_samples
        Center each training sample's rows on the overall mean profile before the z-scores, so the model
        learns the variation within samples (between spots of a section) and not the differences between
        the samples' mean profiles (batch effects that morphology of a new section cannot predict).
        Default: ``True`` for ``target="spot"``, ``False`` for ``target="bulk"`` (one row per sample).
    validation
        Early-stopping split, from the training data: ``"sample"`` holds out whole samples (20% of them, at
        least one; chosen by the seed), a float holds out that fraction of the bags at random, ``None``
        trains for ``epochs`` epochs without early stopping. The monitored score is the validation
        PCC_gene (the validation MSE when there are fewer than 3 validation bags).
    context_radius
        Cells within this distance (micrometres) of a spot center join its bag as context (attended to by
        the Transformer, not pooled). 0 switches context off.
    max_context
        Most context cells per spot (subsampled evenly along the distance to the center).
    chunk_size
        Bulk: cells per chunk (Transformer sequence) of a slide.
    max_cells
        Bulk: most cells per slide and training step (random chunks).
    cell_dropout
        Training: probability of dropping each cell from its bag in a step.
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
    n_members
        Ensemble size: networks trained with seeds ``seed, seed + 1, ...``; predictions are their mean. With
        ``validation="sample"`` the members hold out different training samples in turn (with 3 training
        sections and 3 members, each section validates one member and trains the other two).
    gene_reference
        With ``gene_rank`` (a BiTro option): expression of *other* sections (raw counts in ``.X``, sections in
        ``.obs["sample"]``, e.g. :func:`bitro.datasets.her2st_atlas`), whose principal axes (each section centred,
        on the target scale, z-scored like the targets) span the gene space instead of the training targets'.
        Expression only, no images; it must not hold the sections (or patients) a model is evaluated on.
    aux_key
        An auxiliary training target (a BiTro option): a per-row embedding in the expression table's ``.obsm``,
        e.g. the batch-agnostic latent of :func:`bitro.tl.expression_encoder` (``enc.embed(spots)`` writes
        ``.obsm["X_bitro_latent"]``). A small head predicts it from the pooled spot embedding during training; the
        loss becomes the gene loss plus ``aux_weight`` (a BiTro option, default 1.0) times the MSE of the
        auxiliary target, centred within samples like the gene targets and z-scored per column (the MSE on
        z-scores keeps the latent's magnitude, which a cosine would drop, and puts the two losses on one scale).
        Training only: predictions stay genes, early stopping watches the genes; the head's width and weight are
        saved in the architecture. Every row needs finite values. Measured (``docs/benchmarks.md``, "The latent as a
        target for BiTro"): scVI's batch-agnostic latent as the auxiliary target gains nothing measurable on HER2ST
        (leave-one-section-out PCC_gene 0.134 against 0.133 without, single networks; 0.131 and 0.130 with
        ``aux_weight`` 0.3 and 3), so it is off by default.
    patch_key
        Multi-scale patch tokens beside the cell tokens (a BiTro option, spot targets): a per-spot image embedding in
        the spot table's ``.obsm`` (spots x ``patch_scales * d``; e.g. frozen EfficientNet-Lite0 embeddings of 150,
        300 and 600 um fields of view around each spot, concatenated: ``bt.pp.spot_patches(sdata,
        encoder="efficientnet", scales=3, fov="growing")``, then the mean of each spot's tokens per scale,
        :func:`bitro.tl.spot_image_features`: ``.obsm["X_bitro_image"]``, as ``benchmarks/her2st.py --embed``
        makes them). It is cut into ``patch_scales`` (a BiTro option, default 1)
        equal chunks, one per scale, each standardised with the training spots' statistics (saved with the model)
        and projected by a linear layer of its own (a level-dependent embedding, as M2ORT's) into a token that
        joins the spot's Transformer sequence beside its cells and context cells: the cells attend to it, the
        pooling reads the cells (needs ``transformer_layers`` >= 1; cell dropout never drops it). Every row needs
        finite values; predicting then needs a spot table with the same ``.obsm`` key and width (measured spots
        only: no virtual spots over the tissue, no slides without spots, no :func:`bitro.tl.transfer`). The fields
        of cells (``field_radii``, below) are left out with it. Measured in ``docs/benchmarks.md`` ("Multi-scale
        patch tokens in BiTro").
    refit
        After early stopping, train again on all the training data (validation included) for the chosen
        number of epochs.
    checkpoint_dir
        Folder for per-epoch checkpoints; an interrupted fit called again with the same data, parameters
        and folder resumes from the last complete epoch.
    device
        Torch device; default ``bitro.settings.device``.
    **model_options
        The model's hyper-parameters (unknown names fail with the list of valid ones). BiTro's:

        - ``dim`` (64): embedding width; ``heads`` (4): attention heads of the GAT and Transformer layers;
          ``transformer_layers`` (1); ``ff_dim`` (128): Transformer feed-forward width; ``dropout`` (0.1).
        - ``gat_layers`` (0): GAT layers on the cell kNN graph before the Transformer; the paper has 1. Measured
          (``docs/benchmarks.md``, "GAT and the cells"): without it the cells' values tell the cells of a spot apart
          far better (synthetic slides: per-cell PCC_gene +0.142 over an equal split of each spot against +0.091
          with it; HER2ST silver standard 0.509 against 0.465), at equal spot accuracy within run-to-run noise
          (HER2ST leave-one-section-out PCC_gene 0.133 against 0.135).
        - ``readout``: ``"cell"`` (default), a per-gene linear output applied to each cell's own embedding, the
          bag's prediction being the attention-weighted mean of its cells' plus the bag-size term (cell values
          carry each cell's own information and do not depend on how many cells share its bag; see
          :func:`bitro.tl.predict`); ``"gene"``, a linear output per gene on the pooled embedding, cells getting
          the paper's attention shares (Eq. 10); ``"shared"``, the paper's MLP shared by all genes. Measured
          (``docs/benchmarks.md``): ``"cell"`` scores HER2ST leave-one-section-out PCC_gene 0.134 against 0.124
          for ``"gene"``, and on synthetic slides its cells beat an equal split of each spot's prediction, which
          the attention shares do not.
        - ``bag_size`` (True): give the readout each bag's cell count (standardized log): attention pooling is a
          weighted mean and cannot see how many cells a spot holds, which drives its library size and composition.
        - ``cluster_weight`` (0.1): weight of the cluster loss (0 switches it off; then no phenotypes are needed).
        - ``gene_rank`` (5): the gene queries and per-gene output weights are factored through a fixed basis of this
          many gene programmes, the top principal axes of the training targets (or of ``gene_reference``), so genes
          share strength; 0: one free row per gene. Measured (``docs/benchmarks.md``, "A gene space for BiTro"):
          HER2ST leave-one-section-out PCC_gene 0.149 (rank 10: 0.145; 20: 0.140; with the atlas's axes, rank 10:
          0.151) against 0.133 with free rows. ``rank_queries`` (True): factor the gene queries too.
        - ``retrieval_weight`` (0.5 for spot models, 0 for bulk models): blend each prediction with retrieval from
          the training spots, the mean of their measured profiles weighted by the softmax of their cosine similarity
          to the predicted profile (``retrieval_temperature``, 0.1); 0 switches it off, 1 predicts by retrieval
          alone. The training spots' targets are saved with the model (spots x genes float32 per network). Measured
          (``docs/benchmarks.md``, "Retrieval blended with regression").
        - ``field_radii`` ((75, 150, 300) um for spot models; () for bulk models, with ``patch_key`` or without a
          Transformer): fields of cells, one token per radius in each spot's Transformer sequence beside its cells,
          the mean features of the cells within that distance of the spot's centre (fields of 150, 300 and 600 um),
          standardised with the training spots' statistics and projected by a linear layer per radius. They come
          from the cell table alone, so measured spots, virtual spots over the tissue and slides without spots all
          get them; bulk bags (no centre; e.g. after :func:`bitro.tl.transfer` to bulk) leave them out. ``()``
          switches them off. Measured (``docs/benchmarks.md``, "Fields of cells").

        M2ORT's and CMRCNet's options: :class:`bitro.tl.models.M2ORTArchitecture`,
        :class:`bitro.tl.models.CMRCNetArchitecture`.

    Returns
    -------
    The trained :class:`~bitro.tl.BitroModel`; its ``history`` holds the training curves.

    Examples
    --------
    >>> model = bt.tl.fit(sdata, target="spot")  # doctest: +SKIP
    >>> model = bt.tl.fit(sdata, target="spot", dim=32, readout="gene")  # doctest: +SKIP
    >>> bt.tl.predict(model, new_sdata)  # doctest: +SKIP
    """
    params = {
        k: v for k, v in locals().items() if k not in ("data", "cells", "genes", "model_options", "gene_reference")
    }
    from bitro.tl._bags import (
        cell_data,
        feature_config,
        field_embeddings,
        log_cell_count,
        make_bags,
        patch_embeddings,
        pooled_radius,
        resolve_tables,
    )
    from bitro.tl._config import BagSettings, ModelConfig
    from bitro.tl._persist import BitroModel, cell_reference
    from bitro.tl._targets import aux_targets, aux_values, check_table, reference_targets, training_targets
    from bitro.tl._train import TrainOptions, split, train_ensemble

    params["checkpoint_dir"] = None if checkpoint_dir is None else str(checkpoint_dir)
    _check_params(params)
    spec = get_model(model)
    probe = spec.architecture.for_data(n_features=1, n_genes=1, bag_sizes=[0.0], **model_options)  # fails now
    patches = spec.reads_patches
    if patches and target != "spot":
        msg = f"model={spec.name!r} predicts spots from their image patches; train it with target='spot'."
        raise ValueError(msg)
    cells_key = params["cells_key"] = cells_key or spec.architecture.input_table
    use_rep = params["use_rep"] = use_rep or spec.architecture.default_rep
    if gene_reference is not None and not getattr(probe, "gene_rank", 0):
        msg = (
            f"`gene_reference` spans the gene space of the `gene_rank` option, which is off; set e.g. gene_rank=10"
            f"{'' if hasattr(probe, 'gene_rank') else f' (model={spec.name!r} has no such option: drop gene_reference)'}."
        )
        raise ValueError(msg)
    if aux_key is not None and not hasattr(probe, "aux_dim"):
        msg = f"`aux_key` trains an auxiliary head of BiTro; model={spec.name!r} has none: drop aux_key."
        raise ValueError(msg)
    if aux_key is None and "aux_weight" in model_options:
        msg = "`aux_weight` weighs the auxiliary target of `aux_key`, which is not given; give aux_key or drop aux_weight."
        raise ValueError(msg)
    if patch_key is not None and not hasattr(probe, "patch_dim"):
        msg = f"`patch_key` adds patch tokens to BiTro's Transformer; model={spec.name!r} has none: drop patch_key."
        raise ValueError(msg)
    if patch_key is not None and target != "spot":
        msg = "`patch_key` gives each spot a patch embedding; a bulk model has no spots: drop patch_key."
        raise ValueError(msg)
    if patch_key is None and "patch_scales" in model_options:
        msg = "`patch_scales` cuts the patch embedding of `patch_key`, which is not given; give patch_key or drop patch_scales."
        raise ValueError(msg)
    radii = tuple(getattr(probe, "field_radii", ()))
    if radii and (target != "spot" or patch_key is not None or not probe.transformer_layers):
        if model_options.get("field_radii"):
            why = (
                "a bulk model's bags have no centre"
                if target != "spot"
                else "they and the patch tokens of `patch_key` cannot be combined"
                if patch_key is not None
                else "they join the Transformer, which is off (transformer_layers=0)"
            )
            msg = f"`field_radii` gives each spot fields of cells, but {why}: set field_radii=()."
            raise ValueError(msg)
        radii = ()  # the default's fields only where spots have a centre and a Transformer reads them
    if genes is not None:
        genes = check_names("genes", genes)
    table, cells = resolve_tables(data, target, cells=cells, table_key=table_key, cells_key=cells_key)
    if patches and (record_of(cells) or {}).get(PATCH_LAYOUT) is None:
        msg = (
            f"model={spec.name!r} reads spot patches, but the table given as its input is not a patch table (a cell "
            "table?): run `bt.pp.spot_patches(sdata)` and train on the table it writes (`cells=sdata['patches']`)."
        )
        raise ValueError(msg)
    counts = check_table(table, target)
    aux_all = None if aux_key is None else aux_values(table, aux_key)
    patch_all = None if patch_key is None else patch_embeddings(table, patch_key)
    if patch_all is not None:  # the cut into scales and the Transformer checked before any work
        dataclasses.replace(probe, patch_dim=patch_all.shape[1], field_radii=())
    cells_data = cell_data(
        cells,
        use_rep=use_rep,
        graph_key=graph_key,
        phenotype_key=phenotype_key,
        need_phenotype=probe.needs_phenotype,
    )
    tokens = field_embeddings(table, cells_data, radii) if radii else patch_all
    features = feature_config(cells, use_rep)
    # a spot's patch is its whole input: no tokens of neighbouring spots' patches join it as context
    radius = 0.0 if patches else float(context_radius)
    settings = BagSettings(context_radius=radius, max_context=max_context, chunk_size=chunk_size)
    bags, keep = make_bags(
        table, cells_data, target, settings, for_what="train", patches=patches, embeddings=tokens
    )
    samples = table.obs[Key.SAMPLE].astype(str).to_numpy()[keep]
    center = target == "spot" if center_samples is None else center_samples
    chosen, zscore, yz = training_targets(
        counts[keep], table.var_names, samples, scale=scale, genes=genes, n_top_genes=n_top_genes, center=center
    )
    reference = None if gene_reference is None else reference_targets(gene_reference, chosen, scale, zscore)
    aux = None if aux_all is None else aux_targets(aux_all[keep], samples, center=center)
    splits = [split(samples, validation, seed, k) for k in range(n_members)]  # raises before any training
    arch = spec.architecture.for_data(
        n_features=cells_data.n_features,
        n_genes=len(chosen),
        bag_sizes=[log_cell_count(b) for b in bags],
        features=features,
        **model_options,
    )
    if aux is not None:
        arch = dataclasses.replace(arch, aux_dim=aux.shape[1])
    if hasattr(arch, "field_radii"):
        arch = dataclasses.replace(arch, field_radii=radii)
    build = spec.network
    if tokens is not None:
        arch = dataclasses.replace(arch, patch_dim=tokens.shape[1], patch_scales=arch.patch_scales or len(radii) or 1)
        mean, std = tokens[keep].mean(0), tokens[keep].std(0)
        std = np.where(std > 1e-6, std, 1.0)

        def build(a):
            return spec.network(a).set_patch_scaling(mean, std)

    if target != "spot" and getattr(arch, "retrieval_weight", 0) and "retrieval_weight" not in model_options:
        arch = dataclasses.replace(arch, retrieval_weight=0.0)  # measured on spots; bulk has a few slides to retrieve
    options = TrainOptions.from_params(params)
    dev = resolve_device(device)
    logger.info(
        f"Training {spec.name} on {len(bags)} {target} bags, {len(chosen)} genes, {cells_data.features.shape[0]} cells, "
        f"device {dev}."
    )
    nets, histories, members = train_ensemble(
        lambda k: build(arch),
        bags,
        yz,
        cells_data,
        samples,
        splits,
        options=options,
        seed=seed,
        epochs=epochs,
        device=dev,
        desc="fit",
        refit=refit,
        checkpoint_dir=checkpoint_dir,
        reference=reference,
        aux=aux,
    )
    settings.spot_radius = pooled_radius(bags, cells_data) if target == "spot" else None
    config = ModelConfig(
        model=spec.name,
        target=target,
        scale=scale,
        genes=chosen,
        zscore_mean=zscore.mean.tolist(),
        zscore_std=zscore.std.tolist(),
        feature_key=use_rep,
        features=features,
        architecture=arch,
        bags=settings,
        training={**params, **model_options, "gene_reference": _describe(gene_reference)},
        training_samples=sorted(set(samples)),
        members=members,
        patch_key=patch_key,
    )
    return BitroModel(nets, config, histories, cell_reference(cells, phenotype_key))



def _describe(reference: AnnData | None) -> dict[str, Any] | None:
    """What the saved config records of a ``gene_reference``: its size and sections."""
    if reference is None:
        return None
    samples = sorted(map(str, reference.obs[Key.SAMPLE].unique()))
    return {"n_obs": int(reference.n_obs), "n_vars": int(reference.n_vars), "samples": samples}
