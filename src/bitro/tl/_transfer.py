"""Transfer learning between the bulk and spot levels.

:func:`transfer`, the fine-tuned :class:`TransferredModel` (LoRA adapters kept apart from the base,
mergeable) and :func:`load_adapters`.

:mod:`peft` (which imports transformers, ~5 s) is imported only inside these functions.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from anndata import AnnData

from bitro._checks import check_int, check_number
from bitro._constants import Key
from bitro._features import file_digest
from bitro._logging import logger
from bitro.tl._fit import TARGETS, check_table, check_validation, resolve_device, resolve_tables
from bitro.tl._persist import CHECKSUMS, FORMAT_VERSION, BitroModel, finish_save, read_weights, write_folder
from bitro.tl._targets import check_counts, dense, select_genes, standardise_targets, to_scale

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from bitro.tl._model import BitroNet

METHODS: tuple[str, ...] = ("lora", "full")
TRAIN_GENES: tuple[str, ...] = ("all", "new")
#: Default LoRA targets: input projection, attention q/k/v/o and feed-forward layers of every Transformer layer.
LORA_TARGETS: tuple[str, ...] = ("in_proj", "q", "k", "v", "o", "ff1", "ff2")
#: Gene-specific parameters (one row per gene), carried over by gene symbol.
#: The shared readout MLP (``readout="shared"``): part of the head, trained in full with ``train_genes="all"``.
SHARED_READOUT = "readout_mlp"
ADAPTER_NAME = "default"
ADAPTER_CONFIG = "adapters.json"
ADAPTER_WEIGHTS = "adapters.safetensors"


# -- networks --------------------------------------------------------------------------------------------
def has_adapters(net: BitroNet) -> bool:
    """Whether ``net`` holds unmerged LoRA layers."""
    return any(hasattr(m, "lora_A") for m in net.modules())


def merged_net(net: BitroNet) -> BitroNet:
    """A copy of ``net`` with its LoRA adapters merged into the base layers: a plain :class:`BitroNet`."""
    net = copy.deepcopy(net)
    if not has_adapters(net):
        return net
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(net.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, module.get_base_layer())
    return net


def model_fingerprint(model: BitroModel) -> str:
    """Hash of a model's architecture, genes, features and weights (identifies the base of saved adapters)."""
    h = hashlib.sha256()
    meta = {k: model.config.get(k) for k in ("architecture", "genes", "feature_key", "target", "scale")}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for net in model.nets:
        for name, t in sorted(net.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def carry_genes(
    source: BitroNet, source_genes: list[str], genes: list[str], *, seed: int, **arch_update: Any
) -> BitroNet:
    """A network for ``genes``: every weight of ``source``, gene rows matched by symbol, new genes initialised fresh.

    ``arch_update``: architecture fields to replace (e.g. the target data's bag-size statistics).
    """
    import torch

    from bitro.tl._model import GENE_PARAMS, Architecture, BitroNet

    arch = Architecture(**{**source.arch.to_dict(), **arch_update, "n_genes": len(genes)})
    torch.manual_seed(seed)
    net = BitroNet(arch)
    pos = {g: i for i, g in enumerate(source_genes)}
    rows = [i for i, g in enumerate(genes) if g in pos]
    src_rows = [pos[genes[i]] for i in rows]
    state = net.state_dict()
    for name, t in source.state_dict().items():
        if name in GENE_PARAMS:
            state[name][rows] = t[src_rows]
        else:
            state[name] = t
    net.load_state_dict(state)
    return net


def _check_lora_targets(net: BitroNet, targets: list[str]) -> None:
    from torch import nn

    linear = sorted(
        {
            n.rpartition(".")[2]
            for n, m in net.named_modules()
            if isinstance(m, nn.Linear) and not n.startswith(SHARED_READOUT)
        }
    )
    for t in targets:
        hits = [(n, m) for n, m in net.named_modules() if n and (n == t or n.endswith("." + t))]
        if not hits:
            msg = f"target_modules: no layer is named {t!r}; LoRA can target these torch.nn.Linear layers: {linear}."
            raise ValueError(msg)
        for n, m in hits:
            if not isinstance(m, nn.Linear) or n.startswith(SHARED_READOUT):
                what = (
                    "the readout is trained in full"
                    if n.startswith(SHARED_READOUT)
                    else f"it is a {type(m).__module__}.{type(m).__name__}, not a torch.nn.Linear"
                )
                msg = (
                    f"target_modules: {t!r} names {n!r}, which LoRA cannot target here ({what}); use some of {linear}."
                )
                raise ValueError(msg)


def _inject(net: BitroNet, lora: dict[str, Any], *, seed: int) -> BitroNet:
    """Add LoRA adapters to ``net`` in place (base weights frozen by peft)."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=lora["rank"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=list(lora["target_modules"]),
        bias="none",
    )
    return inject_adapter_in_model(config, net, adapter_name=ADAPTER_NAME)


def _is_head(name: str, train_genes: str) -> bool:
    from bitro.tl._model import GENE_PARAMS

    return name in GENE_PARAMS or (train_genes == "all" and name.startswith(SHARED_READOUT + "."))


def _adapter_names(net: BitroNet, train_genes: str) -> list[str]:
    """Names of the tensors an adapter file holds: LoRA weights and the trained head."""
    return [n for n in net.state_dict() if ".lora_" in n or _is_head(n, train_genes)]


# -- the fine-tuned model ----------------------------------------------------------------------------------
class TransferredModel(BitroModel):
    """A model fine-tuned by :func:`bitro.tl.transfer`: a :class:`~bitro.tl.BitroModel` whose networks may hold LoRA adapters.

    It predicts like any model (:func:`bitro.tl.predict`). :meth:`save_adapters` writes only what fine-tuning
    trained (a small file tied to the base model's fingerprint; read back with :func:`bitro.tl.load_adapters`),
    :meth:`merge` folds the adapters into the base weights, :meth:`save` writes the merged, stand-alone model.
    ``config["transfer"]`` describes the transfer: source target, base fingerprint, method, LoRA settings, genes
    carried over / new / dropped, parameters trained.
    """

    def __repr__(self) -> str:
        info = self.config["transfer"]
        base = super().__repr__().removeprefix("BitroModel(")
        return f"TransferredModel(from={info['source_target']!r}, method={info['method']!r}, adapters={self.has_adapters}, {base}"

    @property
    def has_adapters(self) -> bool:
        """Whether the networks hold unmerged LoRA adapters."""
        return any(has_adapters(net) for net in self.nets)

    def merge(self) -> BitroModel:
        """The model with its adapters merged into the base weights (predictions unchanged).

        Returns
        -------
        A plain :class:`~bitro.tl.BitroModel` (new networks; this model is not changed).

        Examples
        --------
        >>> merged = tuned.merge()  # doctest: +SKIP
        """
        nets = [merged_net(net).eval() for net in self.nets]
        config = copy.deepcopy(self.config)
        config["transfer"]["merged"] = True
        return BitroModel(nets, config, copy.deepcopy(self.history), copy.deepcopy(self.cell_reference))

    def save(self, path: str | Path) -> Path:
        """Write the merged, stand-alone model (read it with :func:`bitro.tl.load_model`); see :meth:`save_adapters`.

        Parameters
        ----------
        path
            Folder to write.

        Returns
        -------
        The folder.
        """
        return self.merge().save(path)

    def save_adapters(self, path: str | Path) -> Path:
        """Write only the adapters and the trained head, apart from the base model.

        Parameters
        ----------
        path
            Folder to write: ``adapters.safetensors`` (LoRA weights, gene queries and readout of the target genes)
            and ``adapters.json`` (the base model's fingerprint, LoRA settings, genes and target statistics).

        Returns
        -------
        The folder.

        Examples
        --------
        >>> tuned.save_adapters("adapters")  # doctest: +SKIP
        >>> tuned = bt.tl.load_adapters(base, "adapters")  # doctest: +SKIP
        """
        from safetensors.torch import save_file

        if not self.has_adapters:
            msg = "This model has no LoRA adapters (method='full', or merged); save the whole model with `model.save(path)`."
            raise ValueError(msg)
        path = Path(path)
        train_genes = self.config["transfer"]["train_genes"]
        tensors = {}
        for k, net in enumerate(self.nets):
            state = net.state_dict()
            tensors.update({f"{k}.{n}": state[n].detach().cpu().contiguous() for n in _adapter_names(net, train_genes)})
        config = dict(self.config, n_members=len(self.nets), history=self.history)

        def write(folder: Path) -> None:
            save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "bitro-adapters"})
            config[CHECKSUMS] = {"weights_sha256": file_digest(folder / ADAPTER_WEIGHTS)}
            (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))

        write_folder(path, (ADAPTER_WEIGHTS, ADAPTER_CONFIG), write)  # written aside: a stop loses nothing
        logger.info(
            f"Saved the adapters of {self!r} to {path} (base model {self.config['transfer']['base_fingerprint']})."
        )
        return path


def load_adapters(base: BitroModel, path: str | Path, *, device: str | None = None) -> TransferredModel:
    """Put adapters written by :meth:`TransferredModel.save_adapters` back onto their base model.

    Parameters
    ----------
    base
        The model that was fine-tuned (from :func:`bitro.tl.fit` or :func:`bitro.tl.load_model`); it is not changed.
    path
        The adapter folder.
    device
        Torch device; default ``bitro.settings.device``.

    Returns
    -------
    The fine-tuned model, as :func:`bitro.tl.transfer` returned it.

    Examples
    --------
    >>> tuned = bt.tl.load_adapters(bt.tl.load_model("base"), "adapters")  # doctest: +SKIP
    """
    path = Path(path)
    file = path / ADAPTER_CONFIG
    if not isinstance(base, BitroModel):
        msg = f"`base` must be a BitroModel (from `bt.tl.fit` or `bt.tl.load_model`), got {type(base).__name__}."
        raise TypeError(msg)
    finish_save(path)  # adapters saved into a shared folder and stopped between their renames
    if not file.is_file():
        msg = f"{path} holds no adapters: {ADAPTER_CONFIG} is missing. Write them with `model.save_adapters(path)`."
        raise FileNotFoundError(msg)
    try:
        config = json.loads(file.read_text())
        info = config["transfer"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        msg = f"The adapter config {file} is corrupted or was not written by `save_adapters` ({e!r})."
        raise ValueError(msg) from e
    got = model_fingerprint(base)
    if got != info["base_fingerprint"]:
        msg = (
            f"These adapters were trained on the base model {info['base_fingerprint']}, not on this one ({got}: other "
            "weights, genes or architecture). Load them onto the model they were fine-tuned from."
        )
        raise ValueError(msg)
    n = int(config.get("n_members", 1))
    if n != len(base.nets):
        msg = f"The adapters have {n} ensemble members, the base model {len(base.nets)}."
        raise ValueError(msg)
    tensors = read_weights(path / ADAPTER_WEIGHTS)
    sums = config.pop(CHECKSUMS, None)
    if sums is not None and file_digest(path / ADAPTER_WEIGHTS) != sums.get("weights_sha256"):
        msg = (
            f"The adapter weights {path / ADAPTER_WEIGHTS} do not match the checksum in {ADAPTER_CONFIG}: they were "
            "corrupted or changed; save the adapters again."
        )
        raise ValueError(msg)
    dev = resolve_device(device)
    nets = []
    sizes = {f: config["architecture"][f] for f in ("size_mean", "size_std")}  # the target's bag-size statistics
    for k, src in enumerate(base.nets):
        net = carry_genes(merged_net(src).cpu(), base.genes, list(config["genes"]), seed=0, **sizes)
        _inject(net, info["lora"], seed=0)
        own = {name[len(f"{k}.") :]: t for name, t in tensors.items() if name.startswith(f"{k}.")}
        expected = set(_adapter_names(net, info["train_genes"]))
        if set(own) != expected:
            msg = (
                f"The adapter weights {path / ADAPTER_WEIGHTS} do not match their config (member {k}); save them again."
            )
            raise ValueError(msg)
        net.load_state_dict(own, strict=False)
        nets.append(net.to(dev).eval())
    history = config.pop("history", [])
    config.pop("n_members", None)
    return TransferredModel(nets, config, history, base.cell_reference)


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


def _check_target_table(table: AnnData, target: str) -> None:
    """Raise when ``table`` is not ``target``-level data."""
    if Key.SAMPLE not in table.obs:
        msg = f"The {target} table has no .obs[{Key.SAMPLE!r}] naming the section of each row; it is neither spot nor bulk data."
        raise KeyError(msg)
    if target == "spot" and Key.SPATIAL not in table.obsm:
        msg = (
            f"target='spot' needs spot data: spot centres in .obsm[{Key.SPATIAL!r}] and spot ids matching the cells' "
            f".obs[{Key.SPOT_ID!r}]. This table has no spot centres; for slide-level (bulk) profiles use target='bulk'."
        )
        raise ValueError(msg)
    if target == "bulk":
        whole = table.obs[Key.SAMPLE].astype(str)  # whole-slide rows (region rows name their spots)
        if Key.SPOT_IDS in table.obs:
            ids = table.obs[Key.SPOT_IDS]
            whole = whole[(ids.isna() | (ids.astype(str) == "")).to_numpy()]
        repeated = sorted(whole[whole.duplicated()].unique())
        if repeated:
            msg = (
                f"target='bulk' needs one row per slide (or region rows with .obs[{Key.SPOT_IDS!r}]), but samples "
                f"{repeated[:5]} have several whole-slide rows: this looks like spot data. Use target='spot', or make "
                "region-level bulk samples with `bt.tl.pseudobulk`."
            )
            raise ValueError(msg)


def transfer(
    model: BitroModel,
    adata: AnnData | SpatialData,
    target: Literal["spot", "bulk"] = "spot",
    *,
    cells: AnnData | None = None,
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
    lr: float = 1e-3,
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
    weight. The gene-specific head (gene queries, per-gene readout or the shared readout MLP) is trained with
    ``train_genes="all"``: the target level has its own normalisation, so each gene's output is re-calibrated.
    Genes are matched by symbol: a gene of both keeps its query and readout, a gene new to the target starts
    fresh (and is always trained), a gene absent from the target is dropped. The target's z-score statistics
    replace the source's. Data preparation, the training loop, the validation split (from the target's training
    samples) and early stopping are those of :func:`bitro.tl.fit`.

    Parameters
    ----------
    model
        The source model (:func:`bitro.tl.fit`, :func:`bitro.tl.load_model` or a previous transfer); not changed.
    adata
        The target-level training data with raw counts: a spot table for ``target="spot"``, a bulk table
        (one row per slide, or region rows from :func:`bitro.tl.pseudobulk`) for ``target="bulk"``; or a
        SpatialData holding it and the ``"cells"`` table.
    target
        ``"spot"`` or ``"bulk"``.
    cells
        The cell table, with features made like the source model's; default: the SpatialData's ``"cells"`` table.
    method
        ``"lora"`` (adapters, base frozen) or ``"full"`` (every weight trained).
    rank
        LoRA rank.
    alpha
        LoRA scaling numerator (the update is scaled by ``alpha / rank``).
    dropout
        Dropout on the LoRA branch input.
    target_modules
        Layers that get adapters (names or name suffixes of :class:`torch.nn.Linear` layers); default: the input
        projection, the attention ``q``/``k``/``v``/``o`` and feed-forward ``ff1``/``ff2`` layers.
    genes
        Genes to predict; default: the source model's genes found in ``adata``.
    train_genes
        ``"all"``: train the head of every gene; ``"new"``: only genes new to the target (carried genes and the
        shared readout keep the source's weights; needs ``weight_decay=0``).
    center_samples
        Centre each target sample's rows on the overall mean profile, as in :func:`bitro.tl.fit`; default
        ``True`` for ``target="spot"``, ``False`` for ``target="bulk"``.
    validation
        Early-stopping split from the target data, as in :func:`bitro.tl.fit`.
    epochs
        Most epochs.
    patience
        Epochs without improvement of the validation score before stopping.
    lr
        Adam learning rate.
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
    params = {k: v for k, v in locals().items() if k not in ("model", "adata", "cells", "genes")}
    from bitro.tl._bags import (
        bulk_bags,
        cell_data,
        check_cells_match_spots,
        log_cell_count,
        pooled_radius,
        size_stats,
        spot_bags,
    )
    from bitro.tl._fit import _split, _train
    from bitro.tl._model import GENE_PARAMS
    from bitro.tl._predict import check_features

    if not isinstance(model, BitroModel) or not model.nets:
        msg = f"`model` must be a trained BitroModel (from `bt.tl.fit` or `bt.tl.load_model`), got {type(model).__name__}."
        raise TypeError(msg)
    training = model.config.get("training", {})
    cluster_weight = float(training.get("cluster_weight", 0.1)) if cluster_weight is None else cluster_weight
    params["cluster_weight"] = cluster_weight
    params["target_modules"] = list(LORA_TARGETS if target_modules is None else target_modules)
    _check_params(params)
    table, cells = resolve_tables(target, adata, cells)
    _check_target_table(table, target)
    check_table(table, target)
    check_features(model, cells)
    counts = dense(table.X)
    check_counts(counts, f"The {target} expression (.X)")

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

    bag_cfg = model.config["bags"]
    data = cell_data(cells, feature_key=model.config["feature_key"], need_phenotype=cluster_weight > 0)
    if target == "spot":
        check_cells_match_spots(table, data)
        all_bags = spot_bags(table, data, context_radius=bag_cfg["context_radius"], max_context=bag_cfg["max_context"])
    else:
        all_bags = bulk_bags(table, data, chunk_size=bag_cfg["chunk_size"])
    keep = np.array([b is not None for b in all_bags])
    if keep.sum() < 2:
        msg = f"Only {int(keep.sum())} {target} rows have cells; at least 2 are needed to fine-tune."
        raise ValueError(msg)
    bags = [b for b in all_bags if b is not None]
    values = to_scale(counts[keep], model.scale)
    y = values[:, table.var_names.get_indexer(genes)]
    samples = table.obs[Key.SAMPLE].astype(str).to_numpy()[keep]
    center = target == "spot" if center_samples is None else center_samples
    zscore, yz = standardise_targets(y, samples, center_samples=center)
    splits = [_split(samples, validation, seed, k) for k in range(len(model.nets))]

    import torch

    new_rows = torch.tensor([g not in set(source_genes) for g in genes])
    sizes = size_stats([log_cell_count(b) for b in bags])  # the target's bag sizes replace the source's
    lora = {
        "rank": int(rank),
        "alpha": float(alpha),
        "dropout": float(dropout),
        "target_modules": params["target_modules"],
    }
    nets = []
    for k, src in enumerate(model.nets):
        net = carry_genes(merged_net(src).cpu(), source_genes, genes, seed=seed + k, **sizes)
        if method == "lora":
            _check_lora_targets(net, lora["target_modules"])
            _inject(net, lora, seed=seed + k)
            for name, p in net.named_parameters():
                if _is_head(name, train_genes):
                    p.requires_grad_(train_genes == "all" or bool(new_rows.any()))
        nets.append(net)
    n_total = sum(p.numel() for n, p in nets[0].named_parameters() if ".lora_" not in n)
    n_trained = sum(
        (int(new_rows.sum()) * p[0].numel() if train_genes == "new" and n in GENE_PARAMS else p.numel())
        for n, p in nets[0].named_parameters()
        if p.requires_grad
    )
    logger.info(
        f"Transfer {model.target} -> {target} ({method}): {len(shared)} genes carried over, {n_new} new, {n_dropped} dropped; "
        f"training {n_trained} of {n_total} parameters ({100 * n_trained / n_total:.1f}%) on {len(bags)} bags."
    )

    hp = {
        "lr": lr,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "cell_dropout": cell_dropout,
        "cluster_weight": cluster_weight,
        "patience": patience,
        "max_cells": int(training.get("max_cells", 2048)),
    }
    dev = resolve_device(device)
    trained, histories = [], []
    for k, net in enumerate(nets):
        hooks = []
        if method == "lora" and train_genes == "new":  # only the rows of new genes move
            for name, p in net.named_parameters():
                if name in GENE_PARAMS and p.requires_grad:
                    mask = new_rows.to(p.dtype).view(-1, *([1] * (p.dim() - 1))).to(dev)
                    hooks.append(p.register_hook(lambda g, m=mask: g * m))
        train_idx, val_idx = splits[k]
        net, hist = _train(
            net.arch,
            bags,
            yz,
            data,
            train_idx,
            val_idx,
            hp=hp,
            seed=seed + k,
            epochs=epochs,
            device=dev,
            folder=None,
            desc=f"transfer seed {seed + k}",
            net=net,
        )
        for h in hooks:
            h.remove()
        hist["validation_samples"] = sorted(set(samples[val_idx])) if validation == "sample" else None
        trained.append(net)
        histories.append(hist)

    config = {k: v for k, v in copy.deepcopy(model.config).items() if k not in ("transfer",)}
    config.update(
        format_version=FORMAT_VERSION,
        target=target,
        genes=list(genes),
        zscore_mean=zscore.mean.tolist(),
        zscore_std=zscore.std.tolist(),
        architecture=trained[0].arch.to_dict(),
        training=params,
        training_samples=sorted(set(samples)),
        bags=dict(model.config["bags"], spot_radius=pooled_radius(bags, data) if target == "spot" else None),
        transfer={
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
        },
    )
    return TransferredModel(trained, config, histories, model.cell_reference)
