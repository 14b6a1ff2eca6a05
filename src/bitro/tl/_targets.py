"""Training targets: gene selection, target scale, gene-wise z-scores.

Every statistic here (highly variable genes, z-score means and standard deviations) is computed on
the TRAINING samples only and stored with the model, so that a held-out section is never looked at.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

Scale = Literal["cp10k", "log1p", "hist2st"]
SCALES: tuple[str, ...] = ("cp10k", "log1p", "hist2st")


def dense(x) -> np.ndarray:
    """A dense float64 copy of a (sparse or dense) matrix."""
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def check_counts(x: np.ndarray, what: str) -> None:
    """Raise when ``x`` holds NaN, infinite or negative values (counts or TPM are expected)."""
    if not np.isfinite(x).all():
        msg = f"{what} contains NaN or infinite values; give raw counts (or TPM) with every value finite."
        raise ValueError(msg)
    if (x < 0).any():
        msg = (
            f"{what} contains negative values ({int((x < 0).sum())} entries); give raw counts (or TPM), "
            "not log-transformed or scaled data."
        )
        raise ValueError(msg)


def check_scale(scale: str) -> None:
    """Raise when ``scale`` is not a known target scale."""
    if not isinstance(scale, str) or scale not in SCALES:
        msg = f"scale={scale!r} is not supported; use one of {SCALES}."
        raise ValueError(msg)


def to_scale(
    counts: np.ndarray,
    scale: str,
    cols: Sequence[int] | np.ndarray | None = None,
    *,
    library: Sequence[int] | None = None,
) -> np.ndarray:
    """Raw counts (rows x ALL genes of the table) -> the columns ``cols`` on a target scale.

    - ``"cp10k"``: ``log1p(10^4 * counts / library size)``, the library size summed over ALL columns of ``counts``;
    - ``"log1p"``: ``log1p(counts)``;
    - ``"hist2st"``: ``log1p(10^4 * counts / library size)``, the library size summed over the predicted genes only:
      the columns ``library`` (by default ``cols``; every column when both are ``None``), so the values depend on
      the gene list. Hist2ST's code (scprep's ``library_size_normalize`` per section, then ``scprep.transform.log``)
      rescales to the section's median library size (older scprep's default; newer versions use 10,000, as here)
      and takes the log base 10: the base changes no Pearson correlation, the rescale constant changes the values
      slightly.

    Rows whose library is 0 are 0. ``cols=None`` returns every column.
    """
    counts = np.asarray(counts, dtype=np.float64)
    picked = counts if cols is None else counts[:, np.asarray(cols, dtype=int)]
    if scale == "log1p":
        return np.log1p(picked)
    check_scale(scale)
    if scale == "cp10k":
        lib = counts.sum(axis=1, keepdims=True)
    elif library is None:
        lib = picked.sum(axis=1, keepdims=True)
    else:
        lib = counts[:, np.asarray(library, dtype=int)].sum(axis=1, keepdims=True)
    return np.log1p(np.divide(picked * 1e4, lib, out=np.zeros_like(picked), where=lib > 0))


def select_genes(
    values: np.ndarray, var_names: Sequence[str], *, genes: Sequence[str] | None, n_top_genes: int
) -> list[str]:
    """The model's genes: ``genes`` as given, or the ``n_top_genes`` most variable (on ``values``, training rows).

    Ranked by variance, ties broken by mean then by name, so the choice is deterministic.
    """
    names = [str(g) for g in var_names]
    if genes is not None:
        from bitro._checks import check_names

        genes = check_names("genes", genes)
        known = set(names)
        missing = [g for g in genes if g not in known]
        if missing:
            msg = (
                f"{len(missing)} requested genes are not in the expression table: {missing[:20]}"
                f"{' ...' if len(missing) > 20 else ''}. Drop them from `genes` or add them to the data."
            )
            raise KeyError(msg)
        return genes
    if n_top_genes < 1:
        msg = f"n_top_genes must be positive, got {n_top_genes}."
        raise ValueError(msg)
    var, mean = values.var(axis=0), values.mean(axis=0)
    order = np.lexsort((np.array(names), -mean, -var))
    return [names[i] for i in order[: min(n_top_genes, len(names))]]


@dataclass
class ZScore:
    """Gene-wise z-scores fitted on training rows (``std`` floored so constant genes stay finite)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray) -> ZScore:
        """Means and standard deviations of the columns of ``values``."""
        std = values.std(axis=0)
        return cls(mean=values.mean(axis=0), std=np.where(std > 1e-8, std, 1.0))

    @staticmethod
    def center_groups(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
        """``values`` with each group's column means replaced by the overall column means.

        What is left is the variation within groups (e.g. between the spots of a section), which is what
        a model can learn from morphology and what PCC_gene on a new section measures; differences
        between the groups' mean profiles (batch effects, patients) are removed from the targets.
        """
        out = values + values.mean(axis=0)
        for g in np.unique(groups):
            rows = groups == g
            out[rows] -= values[rows].mean(axis=0)
        return out

    def transform(self, values: np.ndarray) -> np.ndarray:
        """Target scale -> z-scores."""
        return (values - self.mean) / self.std

    def inverse(self, z: np.ndarray) -> np.ndarray:
        """z-scores -> target scale."""
        return z * self.std + self.mean


def standardize_targets(y: np.ndarray, samples: np.ndarray, *, center_samples: bool) -> tuple[ZScore, np.ndarray]:
    """The z-score statistics of training targets ``y`` and the float32 z-scores.

    With ``center_samples`` each sample's rows are first centred on the overall mean profile
    (:meth:`ZScore.center_groups`).
    """
    if center_samples:
        y = ZScore.center_groups(y, samples)
    zscore = ZScore.fit(y)
    return zscore, zscore.transform(y).astype(np.float32)


def check_table(table: Any, target: str) -> np.ndarray:
    """Raise when the spot / bulk table cannot be trained on; else its expression as a dense array.

    Refused: not an AnnData, no rows or genes, duplicated gene names, no ``.obs["sample"]``, spot data without spot
    centers, bulk data with several whole-slide rows per sample, NaN / infinite / negative values.
    """
    from anndata import AnnData

    from bitro._checks import check_unique_index
    from bitro._constants import Key

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
    if Key.SAMPLE not in table.obs:
        msg = (
            f"The {target} table has no .obs[{Key.SAMPLE!r}] naming the section of each row; add it (one section "
            "name per row)."
        )
        raise KeyError(msg)
    if target == "spot" and Key.SPATIAL not in table.obsm:
        msg = (
            f"target='spot' needs spot data: spot centers in .obsm[{Key.SPATIAL!r}] and spot ids matching the cells' "
            f".obs[{Key.SPOT_ID!r}]. This table has no spot centers; for slide-level (bulk) profiles use target='bulk'."
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
    counts = dense(table.X)
    check_counts(counts, f"The {target} expression (.X)")
    return counts


def training_targets(
    counts: np.ndarray,
    var_names: Sequence[str],
    samples: np.ndarray,
    *,
    scale: str,
    genes: Sequence[str] | None,
    n_top_genes: int,
    center: bool,
) -> tuple[list[str], ZScore, np.ndarray]:
    """The genes to predict, their z-score statistics and the z-scored float32 targets of the training rows.

    ``genes``: the genes asked for (checked against ``var_names``), else the ``n_top_genes`` most variable on the
    target ``scale`` (for ``"hist2st"``, whose library size is summed over the genes chosen, ranked on ``"cp10k"``,
    which is ``"hist2st"`` over all genes); ``center``: center each sample's rows on the overall mean profile first.
    """
    import pandas as pd

    check_scale(scale)
    names = pd.Index(var_names)
    if genes is None:
        ranked_on = to_scale(counts, "cp10k" if scale == "hist2st" else scale)
        chosen = select_genes(ranked_on, names, genes=None, n_top_genes=n_top_genes)
    else:
        chosen = select_genes(counts[:0], names, genes=genes, n_top_genes=n_top_genes)
    values = to_scale(counts, scale, names.get_indexer(chosen))
    zscore, yz = standardize_targets(values, samples, center_samples=center)
    return chosen, zscore, yz


def center_within(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``values`` with each group's column means subtracted (every group centred on zero)."""
    out = values.copy()
    for g in np.unique(groups):
        rows = groups == g
        out[rows] -= values[rows].mean(axis=0)
    return out


#: Least share of the model's genes a ``gene_reference`` must measure.
MIN_REFERENCE_GENES = 0.5


def reference_targets(reference: Any, genes: Sequence[str], scale: str, zscore: ZScore) -> np.ndarray:
    """The ``gene_reference`` of :func:`bitro.tl.fit` on the model's genes and scale, each section centred, z-scored.

    Genes the reference lacks are 0 (no variation); raises when it measures under half of the genes.
    """
    import pandas as pd
    from anndata import AnnData

    from bitro._constants import Key
    from bitro.tl._evaluate import observed_on_scale

    if not isinstance(reference, AnnData):
        msg = f"`gene_reference` must be an AnnData of raw counts (e.g. bt.datasets.her2st_atlas()), got {type(reference).__name__}."
        raise TypeError(msg)
    if Key.SAMPLE not in reference.obs or reference.n_obs < 2:
        msg = f"`gene_reference` needs at least 2 rows and their sections in `.obs[{Key.SAMPLE!r}]`."
        raise ValueError(msg)
    cols = pd.Index(reference.var_names).get_indexer(list(genes))
    found = cols >= 0
    if found.mean() < MIN_REFERENCE_GENES:
        msg = (
            f"`gene_reference` measures {int(found.sum())} of the model's {len(genes)} genes (at least "
            f"{MIN_REFERENCE_GENES:.0%} are needed); use a reference with the same gene symbols."
        )
        raise ValueError(msg)
    values = np.zeros((reference.n_obs, len(genes)))
    rows = np.arange(reference.n_obs)
    values[:, found] = observed_on_scale(reference, rows, cols[found], scale, library=cols[found])
    centred = center_within(values, reference.obs[Key.SAMPLE].astype(str).to_numpy())
    return (centred / zscore.std).astype(np.float32)


def aux_values(table: Any, aux_key: str) -> np.ndarray:
    """The auxiliary target of :func:`bitro.tl.fit` (``aux_key``): ``table.obsm[aux_key]`` as a float array.

    Raises before any work when the key is missing, or the values are not one finite numeric row per row of the
    table.
    """
    import pandas as pd

    fix = (
        f"write one row of numbers per row of the expression table to `.obsm[{aux_key!r}]` first, e.g. the "
        f"expression encoder's latent: `enc.embed(spots, key_added={aux_key!r})` with "
        "`enc = bt.tl.expression_encoder(atlas)`"
    )
    if aux_key not in table.obsm:
        msg = f"`aux_key`: the expression table has no `.obsm[{aux_key!r}]` (it has {sorted(table.obsm)}); {fix}."
        raise KeyError(msg)
    raw = table.obsm[aux_key]
    if isinstance(raw, pd.DataFrame):
        raw = raw.to_numpy()
    elif sp.issparse(raw):
        raw = raw.toarray()
    try:
        values = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as e:
        msg = f"`.obsm[{aux_key!r}]` (`aux_key`) is not numeric ({e}); {fix}."
        raise TypeError(msg) from e
    if values.ndim != 2 or values.shape[0] != table.n_obs or values.shape[1] < 1:
        msg = (
            f"`.obsm[{aux_key!r}]` (`aux_key`) has shape {values.shape}, but the expression table has {table.n_obs} "
            f"rows: it must be ({table.n_obs}, k); {fix}."
        )
        raise ValueError(msg)
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        msg = (
            f"`.obsm[{aux_key!r}]` (`aux_key`) has NaN or infinite values in {int(bad.sum())} of {len(values)} rows "
            f"(e.g. row {int(np.flatnonzero(bad)[0])}); embed every spot, or train on the rows that have values."
        )
        raise ValueError(msg)
    return values


def aux_targets(values: np.ndarray, samples: np.ndarray, *, center: bool) -> np.ndarray:
    """The auxiliary targets of the training bags: centred within samples like the gene targets, z-scored per column.

    ``center``: as :func:`standardize_targets`'s ``center_samples`` (the gene targets and the auxiliary target then
    ask for the same kind of variation, within sections). Constant columns stay 0.
    """
    _, z = standardize_targets(values, samples, center_samples=center)
    return z
