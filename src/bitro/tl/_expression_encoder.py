"""A batch-agnostic expression encoder (TPIR's first stage): scVI or scANVI trained across patients.

:func:`expression_encoder` trains scvi-tools' SCVI (and SCANVI on top of it when region labels are given) on raw
counts with the patient as the batch. The encoder does not see the batch (``encode_covariates=False``), so
spots of patients it never saw are embedded too. :class:`ExpressionEncoder` embeds spots, transfers labels
(scANVI) and is saved without pickle: the weights as safetensors, the settings, genes and categories as JSON.
:func:`integration_scores` measures batch mixing and label separation of any embedding (scib-style silhouettes).

scvi-tools is an optional dependency (``pip install 'bitro[scvi]'``), imported inside the functions.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from bitro._checks import check_anndata, check_int, check_number
from bitro._constants import Key
from bitro._logging import logger
from bitro._utils import import_optional

if TYPE_CHECKING:
    from anndata import AnnData

METHODS = ("scvi", "scanvi")
LIKELIHOODS = ("nb", "zinb", "poisson")
#: ``format`` of the saved config, checked when loading.
FORMAT = "bitro.expression_encoder/1"
#: Internal columns of the AnnData copies handed to scvi-tools.
_BATCH, _LABELS = "_bitro_batch", "_bitro_labels"
#: Share of the encoder's genes a query may lack (filled with zeros) before it is refused.
MAX_MISSING_GENES = 0.5


def _scvi() -> Any:
    return import_optional("scvi", "scvi")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence scvi-tools' and Lightning's INFO logs and their warnings about data loader workers and the like."""
    names = ("scvi", "lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*num_workers.*")
            warnings.filterwarnings("ignore", message=".*fewer than 3 cells.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*logging interval.*")
            warnings.filterwarnings("ignore", message=".*`batch_size` is smaller than.*")
            warnings.filterwarnings("ignore", message=".*Make sure the registered X field.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# --- checks ------------------------------------------------------------------------------------------


def _counts(adata: AnnData, layer: str | None, name: str) -> Any:
    """The raw counts of ``adata`` (``.X`` or ``.layers[layer]``), refused unless non-negative integers."""
    import scipy.sparse as sp

    if layer is not None and layer not in adata.layers:
        msg = f"`layer={layer!r}` is not a layer of `{name}` (layers: {sorted(adata.layers) or 'none'}); pass None for .X."
        raise KeyError(msg)
    x = adata.X if layer is None else adata.layers[layer]
    if x is None:
        msg = f"`{name}.X` is empty; the encoder needs raw counts in .X or a layer (`layer=`)."
        raise ValueError(msg)
    values = x.data if sp.issparse(x) else np.asarray(x)
    where = "`.X`" if layer is None else f"`.layers[{layer!r}]`"
    if not np.isfinite(values).all() or (values < 0).any():
        msg = f"`{name}` {where} holds negative, NaN or infinite values; scVI needs raw counts (non-negative integers)."
        raise ValueError(msg)
    if not np.array_equal(values, np.round(values)):
        msg = (
            f"`{name}` {where} holds non-integer values (normalised or log-transformed?); scVI needs raw counts: "
            "pass the counts (e.g. `layer='counts'`)."
        )
        raise ValueError(msg)
    return x


def _check_column(adata: AnnData, key: str, arg: str, name: str) -> None:
    if not isinstance(key, str) or key not in adata.obs.columns:
        msg = f"`{arg}={key!r}` is not a column of `{name}.obs` (columns: {list(map(str, adata.obs.columns))})."
        raise KeyError(msg)


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        msg = f"`{name}={value!r}` is not one of {', '.join(map(repr, choices))}."
        raise ValueError(msg)


def _labels(adata: AnnData, labels_key: str, unlabeled_category: str) -> pd.Series:
    """The labels as strings, missing values (the unlabelled spots) as ``unlabeled_category``."""
    raw = adata.obs[labels_key]
    names = sorted({str(v) for v in raw.dropna().unique()})
    if unlabeled_category in names:
        msg = (
            f"`unlabeled_category={unlabeled_category!r}` is also a label of `.obs[{labels_key!r}]`; unlabelled spots "
            "are the missing values (NaN) of that column: rename that label or pass another `unlabeled_category`."
        )
        raise ValueError(msg)
    if len(names) < 2:
        msg = f"`.obs[{labels_key!r}]` has {len(names)} label(s) ({names}); scANVI needs at least 2 labels to transfer."
        raise ValueError(msg)
    return raw.astype(object).where(raw.notna(), unlabeled_category).astype(str)


# --- the encoder ------------------------------------------------------------------------------------


class ExpressionEncoder:
    """A trained scVI / scANVI expression encoder (returned by :func:`expression_encoder`).

    Attributes
    ----------
    config
        The settings it was trained with (JSON-serialisable).
    model
        The scvi-tools model.
    """

    def __init__(self, model: Any, config: dict[str, Any]) -> None:
        self.model = model
        self.config = config

    @property
    def method(self) -> str:
        """``"scvi"`` or ``"scanvi"``."""
        return str(self.config["method"])

    @property
    def genes(self) -> list[str]:
        """The genes it reads, in order."""
        return list(self.config["genes"])

    @property
    def batches(self) -> list[str]:
        """The batches (patients) it was trained on."""
        return list(self.config["batches"])

    @property
    def labels(self) -> list[str]:
        """The labels it transfers (scANVI), without the unlabelled category; empty for scVI."""
        unlabeled = self.config["unlabeled_category"]
        return [c for c in self.config.get("label_categories", []) if c != unlabeled]

    @property
    def n_latent(self) -> int:
        """Width of the latent space."""
        return int(self.config["n_latent"])

    def __repr__(self) -> str:
        return (
            f"ExpressionEncoder({self.method}, {len(self.genes)} genes, {self.n_latent} latent, "
            f"batches {self.batches}{', labels ' + str(self.labels) if self.labels else ''})"
        )

    def _query(self, adata: AnnData, layer: str | None, name: str) -> AnnData:
        """A copy of ``adata`` as the model reads it: its genes (missing ones zero), a known batch, no labels."""
        import anndata as ad
        import scipy.sparse as sp

        check_anndata(adata, f"`{name}`", "pass the spots x genes counts table")
        x = _counts(adata, layer, name)
        genes = self.genes
        found = pd.Index(adata.var_names.astype(str)).get_indexer(genes)
        missing = int((found < 0).sum())
        if missing > MAX_MISSING_GENES * len(genes):
            msg = (
                f"`{name}` lacks {missing} of the encoder's {len(genes)} genes (e.g. {[g for g, f in zip(genes, found, strict=True) if f < 0][:5]}); "
                "embed tables measured on the same genes (same gene symbols)."
            )
            raise ValueError(msg)
        if missing:
            logger.warning(
                "%d of the encoder's %d genes are not in `%s`; they are read as zeros.", missing, len(genes), name
            )
        x = sp.csr_matrix(x, dtype=np.float32)
        cols = sp.csr_matrix(
            (np.ones((found >= 0).sum(), np.float32), (found[found >= 0], np.flatnonzero(found >= 0))),
            shape=(x.shape[1], len(genes)),
        )
        obs = pd.DataFrame(index=adata.obs_names.astype(str))
        # the encoder does not read the batch (encode_covariates=False): any known batch gives the same latent
        obs[_BATCH] = pd.Categorical([self.batches[0]] * adata.n_obs, categories=self.batches)
        if self.method == "scanvi":
            cats = list(self.config["label_categories"])
            obs[_LABELS] = pd.Categorical([self.config["unlabeled_category"]] * adata.n_obs, categories=cats)
        return ad.AnnData(sp.csr_matrix(x @ cols), obs=obs, var=pd.DataFrame(index=genes))

    def embed(
        self, adata: AnnData, *, layer: str | None = None, key_added: str | None = Key.EXPRESSION_LATENT
    ) -> np.ndarray:
        """The latent representation (posterior mean) of every spot, of any patient, seen in training or not.

        Parameters
        ----------
        adata
            Spots x genes raw counts; genes matched by name (genes of the encoder it lacks are read as zeros, at
            most half of them).
        layer
            Read the counts from ``.layers[layer]`` instead of ``.X``.
        key_added
            Also write the latent to ``adata.obsm[key_added]``; None writes nothing.

        Returns
        -------
        Spots x ``n_latent``.
        """
        query = self._query(adata, layer, "adata")
        with _quiet():
            z = np.asarray(self.model.get_latent_representation(query), dtype=np.float32)
        if key_added is not None:
            adata.obsm[key_added] = z
        return z

    def normalized_expression(
        self, adata: AnnData, *, layer: str | None = None, n_samples: int = 10, seed: int = 0
    ) -> pd.DataFrame:
        """Every spot's expression as the decoder gives it back from its latent, free of the patient effect.

        scVI's normalised expression (each spot's expected share of its counts per gene, summing to 1 over the
        encoder's genes), decoded as if the spot belonged to each training batch in turn and averaged over them, so
        it no longer depends on which patient the spot came from. Multiply by a library size (e.g. 1e4) and take
        ``log1p`` for a batch-free log1p CP10k.

        Parameters
        ----------
        adata
            Spots x genes raw counts (as for :meth:`embed`).
        layer
            Read the counts from ``.layers[layer]`` instead of ``.X``.
        n_samples
            Posterior samples of each spot's latent averaged over (scVI decodes samples, not the mean).
        seed
            Seed of those samples (the global random state is left as it was), so the same spots give the same values.

        Returns
        -------
        Spots x the encoder's genes (float32 shares), index = ``adata.obs_names``.
        """
        import torch

        from bitro._checks import check_int

        check_int("n_samples", n_samples, minimum=1)
        query = self._query(adata, layer, "adata")
        with _quiet(), torch.random.fork_rng():
            torch.manual_seed(seed)
            rate = self.model.get_normalized_expression(
                query, library_size=1.0, transform_batch=self.batches, n_samples=n_samples, return_numpy=True
            )
        return pd.DataFrame(np.asarray(rate, dtype=np.float32), index=adata.obs_names, columns=self.genes)

    def transfer_labels(
        self, adata: AnnData, *, layer: str | None = None, key_added: str | None = Key.TRANSFERRED
    ) -> pd.DataFrame:
        """The label scANVI gives every spot and its confidence (the classifier's probability of that label).

        Parameters
        ----------
        adata
            Spots x genes raw counts (as for :meth:`embed`).
        layer
            Read the counts from ``.layers[layer]`` instead of ``.X``.
        key_added
            Also write ``adata.obs[key_added]`` (categorical label) and ``adata.obs[f"{key_added}_confidence"]``;
            None writes nothing.

        Returns
        -------
        Spots x (``"label"``, ``"confidence"``, then one probability column per label), index = ``adata.obs_names``.
        """
        if self.method != "scanvi":
            msg = (
                "This encoder is a scVI model without labels; train it with `labels_key=` (scANVI) to transfer labels."
            )
            raise ValueError(msg)
        query = self._query(adata, layer, "adata")
        with _quiet():
            proba = self.model.predict(query, soft=True)
        proba = pd.DataFrame(np.asarray(proba), index=adata.obs_names, columns=[str(c) for c in proba.columns])
        proba = proba[[c for c in self.labels if c in proba.columns]]
        proba = proba.div(proba.sum(axis=1), axis=0)
        label = proba.idxmax(axis=1)
        out = pd.concat(
            [
                pd.DataFrame({"label": pd.Categorical(label, categories=self.labels), "confidence": proba.max(axis=1)}),
                proba,
            ],
            axis=1,
        )
        if key_added is not None:
            adata.obs[key_added] = out["label"].array  # categorical
            adata.obs[f"{key_added}_confidence"] = out["confidence"].to_numpy()
        return out

    def save(self, path: str | Path) -> Path:
        """Write the encoder to the folder ``path``: ``config.json`` and ``weights.safetensors`` (no pickle).

        Returns
        -------
        The folder.
        """
        from bitro.tl._saved import write_saved

        state = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in self.model.module.state_dict().items()}
        return write_saved(Path(path), state, self.config, FORMAT, "ExpressionEncoder.save")


def _build(config: dict[str, Any], adata: AnnData) -> Any:
    """The scvi-tools model of ``config`` set up on ``adata`` (with the internal batch / label columns)."""
    scvi = _scvi()
    kwargs = {
        "n_latent": config["n_latent"],
        "n_hidden": config["n_hidden"],
        "n_layers": config["n_layers"],
        "gene_likelihood": config["gene_likelihood"],
    }
    if config["method"] == "scanvi":
        scvi.model.SCANVI.setup_anndata(
            adata, batch_key=_BATCH, labels_key=_LABELS, unlabeled_category=config["unlabeled_category"]
        )
        return scvi.model.SCANVI(adata, config["unlabeled_category"], **kwargs)
    scvi.model.SCVI.setup_anndata(adata, batch_key=_BATCH)
    return scvi.model.SCVI(adata, **kwargs)


def expression_encoder(
    adata: AnnData,
    *,
    batch_key: str = "patient",
    labels_key: str | None = None,
    method: Literal["scvi", "scanvi"] | None = None,
    layer: str | None = None,
    n_top_genes: int | None = 2000,
    n_latent: int = 10,
    n_hidden: int = 128,
    n_layers: int = 1,
    gene_likelihood: Literal["nb", "zinb", "poisson"] = "nb",
    max_epochs: int = 100,
    scanvi_epochs: int = 20,
    batch_size: int = 128,
    unlabeled_category: str = "unlabeled",
    seed: int = 0,
) -> ExpressionEncoder:
    """Train a batch-agnostic expression encoder across patients: scVI, and scANVI on top of it with labels.

    TPIR's first stage (Nishimura et al., ISBI 2025): a variational autoencoder of the counts whose decoder is
    given the batch, so the latent need not hold it. Its encoder does not read the batch
    (``encode_covariates=False``), so it embeds spots of patients it never saw. With ``labels_key`` the scVI
    model is refined into scANVI, whose classifier on the latent transfers the labels to unlabelled spots.

    Parameters
    ----------
    adata
        Spots x genes raw counts (integers) of any number of sections, e.g.
        :func:`bitro.datasets.her2st_atlas`. Not modified.
    batch_key
        ``.obs`` column of the batch to correct for, e.g. the patient.
    labels_key
        ``.obs`` column of labels (e.g. pathologist regions) for scANVI; the spots without a label are missing
        values (NaN) there.
    method
        ``"scvi"`` or ``"scanvi"``; by default scANVI when ``labels_key`` is given, else scVI.
    layer
        Read the counts from ``.layers[layer]`` instead of ``.X``.
    n_top_genes
        Train on this many highly variable genes (``seurat_v3`` across batches, on the counts); None: all genes.
    n_latent, n_hidden, n_layers
        Width of the latent space, of the hidden layers, and their number.
    gene_likelihood
        Distribution of the counts: negative binomial, zero-inflated negative binomial or Poisson.
    max_epochs
        Epochs of scVI.
    scanvi_epochs
        Epochs of scANVI after scVI (with ``labels_key``).
    batch_size
        Spots per step.
    unlabeled_category
        Name scANVI gives the unlabelled spots; it must not be one of the labels.
    seed
        Random seed (scvi-tools' ``settings.seed``).

    Returns
    -------
    The trained encoder: :meth:`~ExpressionEncoder.embed`, :meth:`~ExpressionEncoder.transfer_labels`,
    :meth:`~ExpressionEncoder.save` (reload with :func:`load_expression_encoder`).

    Examples
    --------
    >>> import bitro as bt
    >>> atlas = bt.datasets.her2st_atlas()  # doctest: +SKIP
    >>> enc = bt.tl.expression_encoder(atlas, batch_key="patient", labels_key="region")  # doctest: +SKIP
    >>> z = enc.embed(atlas)  # doctest: +SKIP
    """
    import anndata as ad
    import scipy.sparse as sp

    # --- every check before any work -----------------------------------------------------------------
    check_anndata(adata, "`adata`", "pass the spots x genes counts table (e.g. `bt.datasets.her2st_atlas()`)")
    _check_column(adata, batch_key, "batch_key", "adata")
    if labels_key is not None:
        _check_column(adata, labels_key, "labels_key", "adata")
    if method is None:
        method = "scanvi" if labels_key is not None else "scvi"
    _choice("method", method, METHODS)
    if method == "scanvi" and labels_key is None:
        msg = "method='scanvi' needs `labels_key=` (the .obs column of the labels, NaN where unknown)."
        raise ValueError(msg)
    _choice("gene_likelihood", gene_likelihood, LIKELIHOODS)
    for name, value in (
        ("n_latent", n_latent),
        ("n_hidden", n_hidden),
        ("n_layers", n_layers),
        ("max_epochs", max_epochs),
        ("scanvi_epochs", scanvi_epochs),
        ("batch_size", batch_size),
    ):
        check_int(name, value, minimum=1)
    check_int("seed", seed, minimum=0)
    if n_top_genes is not None:
        check_int("n_top_genes", n_top_genes, minimum=2)
    if not isinstance(unlabeled_category, str) or not unlabeled_category:
        msg = f"`unlabeled_category` must be a non-empty string, got {unlabeled_category!r}."
        raise TypeError(msg)
    x = _counts(adata, layer, "adata")
    if adata.obs[batch_key].isna().any():
        msg = f"`.obs[{batch_key!r}]` has missing values in {int(adata.obs[batch_key].isna().sum())} spots; give every spot its batch."
        raise ValueError(msg)
    labels = _labels(adata, labels_key, unlabeled_category) if method == "scanvi" else None
    if labels is not None and not (labels != unlabeled_category).any():
        msg = f"No spot has a label in `.obs[{labels_key!r}]`."
        raise ValueError(msg)
    batches = [str(b) for b in pd.unique(adata.obs[batch_key].astype(str))]
    if len(batches) < 2:
        warnings.warn(
            f"`.obs[{batch_key!r}]` holds a single batch ({batches[0]!r}): there is no batch effect to correct; "
            "the encoder is a plain scVI model of these spots.",
            UserWarning,
            stacklevel=2,
        )
    scvi = _scvi()

    # --- the training copy: counts of the genes, internal columns ---------------------------------------
    x = sp.csr_matrix(x, dtype=np.float32)
    obs = pd.DataFrame(index=adata.obs_names.astype(str))
    obs[_BATCH] = pd.Categorical(adata.obs[batch_key].astype(str).to_numpy(), categories=sorted(batches))
    if labels is not None:
        obs[_LABELS] = pd.Categorical(
            labels.to_numpy(), categories=[*sorted(set(labels) - {unlabeled_category}), unlabeled_category]
        )
    train = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=adata.var_names.astype(str)))
    if n_top_genes is not None and n_top_genes < train.n_vars:
        import scanpy as sc

        keep = np.asarray(train.X.sum(axis=0)).ravel() > 0
        train = train[:, keep].copy()
        hvg = sc.pp.highly_variable_genes(
            train,
            flavor="seurat_v3",
            n_top_genes=min(n_top_genes, train.n_vars),
            batch_key=_BATCH if len(batches) > 1 else None,
            inplace=False,
        )
        train = train[:, np.asarray(hvg["highly_variable"])].copy()
    empty = np.asarray(train.X.sum(axis=1)).ravel() == 0
    if empty.all():
        msg = "Every spot of `adata` has zero counts in the genes trained on; the encoder needs counts."
        raise ValueError(msg)
    if empty.any():
        logger.warning(
            "%d spots without counts in the %d genes are left out of training.", int(empty.sum()), train.n_vars
        )
        train = train[~empty].copy()
    config: dict[str, Any] = {
        "method": method,
        "batch_key": batch_key,
        "labels_key": labels_key,
        "n_latent": int(n_latent),
        "n_hidden": int(n_hidden),
        "n_layers": int(n_layers),
        "gene_likelihood": gene_likelihood,
        "max_epochs": int(max_epochs),
        "scanvi_epochs": int(scanvi_epochs) if method == "scanvi" else 0,
        "batch_size": int(batch_size),
        "unlabeled_category": unlabeled_category,
        "seed": int(seed),
        "genes": [str(g) for g in train.var_names],
        "batches": [str(b) for b in train.obs[_BATCH].cat.categories],
        "n_spots": int(train.n_obs),
    }
    trainer = {
        "accelerator": "gpu" if _device() == "cuda" else "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "batch_size": int(batch_size),
        # a last training batch of a single spot breaks batch normalisation ("Expected more than 1 value per
        # channel"): scANVI's labelled sampling can leave one, so the last incomplete batch of an epoch is dropped
        "datasplitter_kwargs": {"drop_last": True},
    }
    logger.info(
        "Training %s on %d spots x %d genes, %d batches, %d epochs.",
        method,
        train.n_obs,
        train.n_vars,
        len(batches),
        max_epochs + (scanvi_epochs if method == "scanvi" else 0),
    )
    with _quiet():
        scvi.settings.seed = int(seed)
        scvi.settings.progress_bar_style = "tqdm"
        scvi.model.SCVI.setup_anndata(train, batch_key=_BATCH)
        model = scvi.model.SCVI(
            train, n_latent=n_latent, n_hidden=n_hidden, n_layers=n_layers, gene_likelihood=gene_likelihood
        )
        model.train(max_epochs=int(max_epochs), **trainer)
        if method == "scanvi":
            model = scvi.model.SCANVI.from_scvi_model(model, unlabeled_category, labels_key=_LABELS, adata=train)
            model.train(max_epochs=int(scanvi_epochs), n_samples_per_label=100, **trainer)
            mapping = model.adata_manager.get_state_registry("labels")["categorical_mapping"]
            config["label_categories"] = [str(c) for c in mapping]
    return ExpressionEncoder(model, config)


def _device() -> str:
    from bitro._utils import resolve_device

    return resolve_device().type


def load_expression_encoder(path: str | Path) -> ExpressionEncoder:
    """Read an encoder written by :meth:`ExpressionEncoder.save`.

    Parameters
    ----------
    path
        The folder with ``config.json`` and ``weights.safetensors``.

    Returns
    -------
    The encoder, ready to embed and transfer labels (it cannot be trained further).
    """
    import anndata as ad
    import scipy.sparse as sp
    import torch

    from bitro.tl._saved import read_saved

    config, arrays = read_saved(Path(path), "expression encoder", FORMAT, "ExpressionEncoder.save")
    _scvi()
    batches = list(config["batches"])
    labels = list(config.get("label_categories", []))
    n = max(len(batches), len(labels), 1)
    obs = pd.DataFrame(index=[str(i) for i in range(n)])
    obs[_BATCH] = pd.Categorical([batches[i % len(batches)] for i in range(n)], categories=batches)
    if config["method"] == "scanvi":
        obs[_LABELS] = pd.Categorical([labels[i % len(labels)] for i in range(n)], categories=labels)
    dummy = ad.AnnData(
        sp.csr_matrix((n, len(config["genes"])), dtype=np.float32), obs=obs, var=pd.DataFrame(index=config["genes"])
    )
    with _quiet():
        model = _build(config, dummy)
        model.module.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
        model.module.eval()
        model.is_trained_ = True
    return ExpressionEncoder(model, config)


# --- scores --------------------------------------------------------------------------------------------


def integration_scores(
    adata: AnnData,
    *,
    use_rep: str,
    batch_key: str = "patient",
    labels_key: str | None = None,
    n_spots: int | None = 5000,
    seed: int = 0,
) -> dict[str, float]:
    """Batch mixing and label separation of an embedding (scib-style silhouettes, Luecken et al. 2022).

    - ``batch_mixing``: ``1 - |s|`` with ``s`` each spot's silhouette by batch, computed among the spots of its
      label (all spots without ``labels_key``), averaged per label, then over labels; 1: batches mixed.
    - ``label_separation``: ``(silhouette by label + 1) / 2``; 1: labels apart (NaN without ``labels_key``).

    Parameters
    ----------
    adata
        The spots, with the embedding in ``.obsm[use_rep]``.
    use_rep
        The embedding, e.g. ``"X_bitro_latent"`` (:meth:`ExpressionEncoder.embed`) or ``"X_pca"``.
    batch_key
        ``.obs`` column of the batch (patient).
    labels_key
        ``.obs`` column of the labels (e.g. regions); spots without a label (NaN) are left out.
    n_spots
        Score a random subset of this many spots (silhouettes cost ``n**2``); None: all.
    seed
        Seed of the subset.

    Returns
    -------
    ``{"batch_mixing": ..., "label_separation": ..., "n_spots": ...}``.
    """
    from sklearn.metrics import silhouette_samples, silhouette_score

    check_anndata(adata, "`adata`", "pass the table of spots with the embedding in .obsm")
    if use_rep not in adata.obsm:
        msg = f"`use_rep={use_rep!r}` is not in `adata.obsm` (keys: {sorted(adata.obsm) or 'none'})."
        raise KeyError(msg)
    _check_column(adata, batch_key, "batch_key", "adata")
    if labels_key is not None:
        _check_column(adata, labels_key, "labels_key", "adata")
    if n_spots is not None:
        check_int("n_spots", n_spots, minimum=10)
    check_int("seed", seed, minimum=0)
    x = np.asarray(adata.obsm[use_rep], dtype=np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        msg = f"`adata.obsm[{use_rep!r}]` must be a finite spots x dimensions matrix."
        raise ValueError(msg)
    batch = adata.obs[batch_key].astype(str).to_numpy()
    if len(set(batch)) < 2:
        msg = f"`.obs[{batch_key!r}]` holds a single batch; batch mixing needs at least 2."
        raise ValueError(msg)
    keep = np.ones(adata.n_obs, bool) if labels_key is None else adata.obs[labels_key].notna().to_numpy()
    label = (
        np.zeros(adata.n_obs, dtype=object) if labels_key is None else adata.obs[labels_key].astype(object).to_numpy()
    )
    rows = np.flatnonzero(keep)
    if n_spots is not None and len(rows) > n_spots:
        rows = np.sort(np.random.default_rng(seed).choice(rows, n_spots, replace=False))
    x, batch, label = x[rows], batch[rows], label[rows].astype(str)
    per_label = []
    for lab in np.unique(label):
        idx = label == lab
        if len(np.unique(batch[idx])) < 2 or idx.sum() < 3:
            continue
        s = silhouette_samples(x[idx], batch[idx])
        per_label.append(float(np.mean(1 - np.abs(s))))
    mixing = float(np.mean(per_label)) if per_label else float("nan")
    separation = float("nan")
    if labels_key is not None and len(np.unique(label)) > 1:
        separation = (float(silhouette_score(x, label)) + 1) / 2
    return {"batch_mixing": mixing, "label_separation": separation, "n_spots": len(rows)}


def log1p_pca(adata: AnnData, *, n_comps: int = 10, layer: str | None = None, key_added: str = "X_pca") -> np.ndarray:
    """The baseline embedding of :func:`integration_scores`: PCA of log1p counts per 10k (no batch correction).

    Parameters
    ----------
    adata
        Spots x genes raw counts.
    n_comps
        Number of components (match the latent's width to compare).
    layer
        Read the counts from ``.layers[layer]`` instead of ``.X``.
    key_added
        Written to ``adata.obsm[key_added]``.

    Returns
    -------
    Spots x ``n_comps``.
    """
    import scanpy as sc
    import scipy.sparse as sp

    check_anndata(adata, "`adata`", "pass the spots x genes counts table")
    check_int("n_comps", n_comps, minimum=1)
    check_number("n_comps", n_comps, high=min(adata.shape) - 1, hint="Fewer components than spots and genes.")
    x = sp.csr_matrix(_counts(adata, layer, "adata"), dtype=np.float64)
    total = np.asarray(x.sum(axis=1)).ravel()
    if (total == 0).any():
        msg = f"{int((total == 0).sum())} spots of `adata` have no counts; drop them before the PCA."
        raise ValueError(msg)
    y = sp.diags(1e4 / total) @ x
    y.data = np.log1p(y.data)
    z = sc.pp.pca(y, n_comps=n_comps, random_state=0)
    adata.obsm[key_added] = np.asarray(z, dtype=np.float32)
    return adata.obsm[key_added]
