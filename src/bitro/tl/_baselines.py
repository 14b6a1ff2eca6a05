"""The trivial baselines every accuracy claim is printed beside.

- the training-mean profile: the same prediction for every spot (high PCC_overall, no PCC_gene);
- ridge regression on color statistics of each spot's image patch (RGB, HSV and optical density:
  mean, std and 10/50/90th percentiles of the pixels inside the spot circle, 45 numbers);
- the reduced-rank ridge: the same features regressed onto the scores of a few principal components of
  expression (a gene basis fitted on expression only, e.g. an expression atlas), decoded back to genes. It pools
  strength across genes and is the strong linear baseline.

A model that does not beat them has learned nothing from morphology.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from bitro._checks import check_rgb_image
from bitro._constants import Key
from bitro._deprecate import renamed_args
from bitro._settings import settings
from bitro._utils import check_key, image_offset, scale0
from bitro.tl._targets import Scale, center_within, check_scale

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

#: The ridge penalties tried by internal (leave-one-out) cross-validation.
RIDGE_ALPHAS = np.logspace(-1, 4, 11)


def color_features(pixels: np.ndarray) -> np.ndarray:
    """Color statistics of RGB pixels ``(n, 3)`` uint8: RGB, HSV and optical density; mean, std, percentiles."""
    from skimage.color import rgb2hsv

    rgb = pixels.reshape(-1, 3).astype(np.float64) / 255.0
    hsv = rgb2hsv(rgb.reshape(-1, 1, 3)).reshape(-1, 3)
    od = -np.log(np.clip(rgb, 1 / 255, 1))
    out = []
    for v in (rgb, hsv, od):
        out += [v.mean(0), v.std(0), *np.percentile(v, [10, 50, 90], axis=0)]
    return np.concatenate(out)


@renamed_args(sdata="data")
def color_statistics(
    data: SpatialData, *, table_key: str = Key.SPOTS_TABLE, key_added: str = Key.COLOR_STATS
) -> np.ndarray:
    """Color statistics of the image patch under every spot, for the ridge baseline.

    Parameters
    ----------
    data
        SpatialData with the section images, spot circles and the spot table.
    table_key
        The spot table.
    key_added
        Written to ``data[table_key].obsm[key_added]``.

    Returns
    -------
    The statistics, spots x 45 (also written to the table).
    """
    from spatialdata import SpatialData

    from bitro.io import get_sections

    if not isinstance(data, SpatialData):
        msg = (
            f"`data` must be a SpatialData with the section images, spots and spot table (the colors are measured on "
            f"the images), got {type(data).__name__}."
        )
        raise TypeError(msg)
    check_key(data.tables, table_key, "Table")
    table = data.tables[table_key]
    sections = {s.sample: s for s in get_sections(data) if s.spots_key is not None}
    samples = table.obs[Key.SAMPLE].astype(str).to_numpy()
    missing = sorted(set(samples) - set(sections))
    if missing:
        msg = f"No image with spots for samples {missing} of table {table_key!r}; sections found: {sorted(sections)}."
        raise ValueError(msg)
    for sample in dict.fromkeys(samples):
        key = sections[sample].image_key
        check_rgb_image(scale0(data.images[key]), key, "computing the color statistics")
    check_key(table.obs.columns, Key.SPOT_ID, f"Spot ids of table {table_key!r}: column .obs")
    stats = np.zeros((table.n_obs, 45))
    spot_ids = table.obs[Key.SPOT_ID].astype(str).to_numpy()
    for sample in tqdm(list(dict.fromkeys(samples)), desc="color statistics", disable=not settings.progress):
        section = sections[sample]
        image = scale0(data.images[section.image_key])
        circles = data.shapes[section.spots_key]
        rows = np.flatnonzero(samples == sample)
        found = circles.index.astype(str).get_indexer(spot_ids[rows])
        if (found < 0).any():
            msg = (
                f"Spots {list(spot_ids[rows][found < 0][:5])} of table {table_key!r} are not in {section.spots_key!r}."
            )
            raise ValueError(msg)
        dx, dy = image_offset(data.images[section.image_key], section.coordinate_system)  # a cropped image
        xs, ys = circles.geometry.x.to_numpy()[found] - dx, circles.geometry.y.to_numpy()[found] - dy
        radii = circles["radius"].to_numpy()[found]
        for row, x, y, r in zip(rows, xs, ys, radii, strict=True):
            x0, y0 = max(int(x - r), 0), max(int(y - r), 0)
            crop = image.isel(y=slice(y0, int(y + r) + 1), x=slice(x0, int(x + r) + 1)).transpose("y", "x", "c").values
            yy, xx = np.mgrid[: crop.shape[0], : crop.shape[1]]
            inside = (xx + x0 + 0.5 - x) ** 2 + (yy + y0 + 0.5 - y) ** 2 <= r**2
            stats[row] = color_features(crop[inside])
    table.obsm[key_added] = stats
    return stats


def ridge_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """Standardise, fit ridge regression (alpha chosen by internal cross-validation), predict."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS))
    return model.fit(x_train, y_train).predict(x_test)


def _gene_names(genes: Sequence[str]) -> list[str]:
    """``genes`` as a non-empty list of strings (a bare string is one gene)."""
    if isinstance(genes, str):
        genes = [genes]
    genes = [str(g) for g in genes]
    if not genes:
        msg = "`genes` is empty; give the genes to predict, e.g. `genes=model.genes`."
        raise ValueError(msg)
    return genes


def _check_genes_in(table: AnnData, name: str, genes: list[str]) -> None:
    missing = [g for g in genes if g not in table.var_names]
    if missing:
        shown = ", ".join(map(repr, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        msg = f"{len(missing)} of the {len(genes)} genes are not in `{name}.var_names`: {shown}."
        raise KeyError(msg)


def _check_anndata(table: object, name: str) -> None:
    from anndata import AnnData

    if not isinstance(table, AnnData):
        msg = f"`{name}` must be an AnnData of spots, got {type(table).__name__}."
        raise TypeError(msg)


def _features(table: AnnData, use_rep: str, name: str) -> np.ndarray:
    """The features ``table.obsm[use_rep]`` as a float64 matrix, or a one-sentence error."""
    if use_rep not in table.obsm:
        hint = " (compute them with `bt.tl.color_statistics(sdata)`)" if use_rep == Key.COLOR_STATS else ""
        msg = (
            f"`{name}.obsm` has no {use_rep!r}{hint}; the features regressed are `.obsm[use_rep]` "
            f"(keys: {sorted(table.obsm) or 'none'})."
        )
        raise KeyError(msg)
    x = np.asarray(table.obsm[use_rep], dtype=np.float64)
    if x.ndim != 2 or x.shape[1] == 0:
        msg = f"`{name}.obsm[{use_rep!r}]` must be a rows x features matrix, got shape {x.shape}."
        raise ValueError(msg)
    if not np.isfinite(x).all():
        msg = f"`{name}.obsm[{use_rep!r}]` holds NaN or infinite values in {int((~np.isfinite(x)).any(1).sum())} rows."
        raise ValueError(msg)
    return x


def _groups(table: AnnData, library_key: str | None, name: str) -> np.ndarray:
    """Each row's section (``.obs[library_key]``), or one group for all rows when ``library_key`` is None."""
    if library_key is None:
        return np.zeros(table.n_obs, dtype=int)
    if library_key not in table.obs:
        msg = (
            f"`library_key={library_key!r}` is not a column of `{name}.obs` (columns: {list(table.obs.columns)}); "
            "name the column of each row's section, or pass `library_key=None` (no per-section centring)."
        )
        raise KeyError(msg)
    return table.obs[library_key].astype(str).to_numpy()


def gene_basis(values: np.ndarray, groups: np.ndarray, n_components: int) -> np.ndarray:
    """The top ``n_components`` principal axes (rows, orthonormal) of ``values`` centred per group: components x genes.

    Signs are fixed so that each axis's largest absolute loading is positive (deterministic). With more rows than
    genes the axes are the eigenvectors of the genes' scatter matrix (much faster than an SVD of the rows).
    """
    from scipy.linalg import eigh

    centred = center_within(values, groups)
    n_genes = centred.shape[1]
    if centred.shape[0] > n_genes:  # the top eigenpairs only, largest first
        eigval, eigvec = eigh(centred.T @ centred, subset_by_index=[n_genes - n_components, n_genes - 1])
        vt = eigvec[:, np.argsort(eigval)[::-1]].T
    else:
        vt = np.linalg.svd(centred, full_matrices=False)[2][:n_components]
    signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])
    return vt * np.where(signs == 0, 1.0, signs)[:, None]


def _rrr_inputs(
    train: AnnData,
    test: AnnData,
    genes: list[str],
    *,
    use_rep: str,
    reference: AnnData | None,
    n_components: int,
    library_key: str | None,
    cap: bool,
) -> dict | None:
    """Check every input of the reduced-rank ridge (one-sentence errors, nothing computed yet); what it needs.

    ``cap``: use at most the components available instead of raising, and return None when the basis data give
    none (as :func:`add_baselines` does: the row is left out).
    """
    from bitro._checks import check_int

    check_int("n_components", n_components, minimum=1)
    x_train, x_test = _features(train, use_rep, "train"), _features(test, use_rep, "test")
    if x_train.shape[1] != x_test.shape[1]:
        msg = (
            f"`.obsm[{use_rep!r}]` has {x_train.shape[1]} columns in `train` but {x_test.shape[1]} in `test`; "
            "compute both the same way."
        )
        raise ValueError(msg)
    train_groups = _groups(train, library_key, "train")
    if reference is None:
        shared = list(genes)
        n_rows, n_groups, source = train.n_obs, len(np.unique(train_groups)), "the training spots"
        ref_groups = None
    else:
        _check_anndata(reference, "reference")
        ref_groups = _groups(reference, library_key, "reference")
        known = set(map(str, reference.var_names))
        shared = [g for g in genes if g in known]
        if not shared:
            msg = (
                f"The reference shares none of the {len(genes)} genes (genes: {genes[:3]}, reference: "
                f"{list(map(str, reference.var_names[:3]))}); use the same gene symbols in both."
            )
            raise KeyError(msg)
        if reference.var_names.has_duplicates:
            msg = "The reference's genes (.var_names) are not unique; make them unique or sum the duplicated genes."
            raise ValueError(msg)
        if library_key is not None and library_key in test.obs:
            leaked = sorted(set(ref_groups) & set(test.obs[library_key].astype(str)))
            if leaked:
                msg = (
                    f"The reference holds the test section(s) {leaked[:5]} (`.obs[{library_key!r}]`); the gene basis "
                    "must not see the held-out sections: leave them (and their patient's sections) out of it."
                )
                raise ValueError(msg)
        n_rows, n_groups, source = reference.n_obs, len(np.unique(ref_groups)), "the reference"
    available = min(n_rows - n_groups, len(shared))
    if available < 1 and cap:
        return None
    if available < 1:
        msg = (
            f"{source[0].upper()}{source[1:]} cannot give a gene basis: {n_rows} rows in {n_groups} section(s) "
            f"leave no variation within sections (or no gene) after per-section centring."
        )
        raise ValueError(msg)
    if n_components > available:
        if not cap:
            what = f"{len(shared)} genes" + (" shared with `genes`" if reference is not None else "")
            msg = (
                f"n_components={n_components} is more than the {available} components {source} can give "
                f"({n_rows} rows in {n_groups} section(s), {what}); use at most {available}."
            )
            raise ValueError(msg)
        n_components = available
    return {
        "x_train": x_train,
        "x_test": x_test,
        "train_groups": train_groups,
        "ref_groups": ref_groups,
        "shared": shared,
        "n_components": n_components,
    }


def _rrr_predict(
    train_y: np.ndarray, genes: list[str], scale: str, reference: AnnData | None, inputs: dict
) -> np.ndarray:
    """The reduced-rank ridge's predictions of the test rows (test rows x genes), from checked ``inputs``."""
    from bitro.tl._evaluate import observed_on_scale

    k, shared = inputs["n_components"], inputs["shared"]
    mean = train_y.mean(axis=0)
    centred = center_within(train_y, inputs["train_groups"])
    pos = pd.Index(genes).get_indexer(shared)
    if reference is None:
        basis = gene_basis(train_y, inputs["train_groups"], k)
    else:
        ref_y = observed_on_scale(reference, np.arange(reference.n_obs), reference.var_names.get_indexer(shared), scale)
        basis = gene_basis(ref_y, inputs["ref_groups"], k)
    scores = centred[:, pos] @ basis.T  # the training spots' component scores
    loadings = np.zeros((k, len(genes)))
    loadings[:, pos] = basis
    others = np.setdiff1d(np.arange(len(genes)), pos)
    if len(others):  # genes the reference lacks: their loadings from the training spots' scores (least squares)
        loadings[:, others] = np.linalg.lstsq(scores, centred[:, others], rcond=None)[0]
    return ridge_predict(inputs["x_train"], scores, inputs["x_test"]) @ loadings + mean


def reduced_rank_ridge(
    train: AnnData,
    test: AnnData,
    *,
    genes: Sequence[str],
    scale: Scale,
    use_rep: str = Key.COLOR_STATS,
    reference: AnnData | None = None,
    n_components: int = 10,
    library_key: str | None = Key.SAMPLE,
    key_added: str = Key.BASELINE_RRR,
) -> pd.DataFrame:
    """Predict ``test`` with a reduced-rank ridge regression from image features, fitted on ``train``.

    The strong linear baseline: instead of one ridge regression per gene (which fits each gene's noise), the
    image features are regressed onto a few gene programmes shared by all genes:

    1. **Gene basis**, fitted on expression only (no image): the top ``n_components`` principal components of
       the expression on ``scale``, each section centred on its own mean profile first (``library_key``),
       either of ``reference`` (e.g. an expression atlas such as :func:`bitro.datasets.her2st_atlas`) or, by
       default, of the training spots themselves.
    2. **Scores** of the training spots: their per-section-centred expression projected onto the basis.
    3. **Ridge** from the standardised features ``.obsm[use_rep]`` to the scores (``alpha`` chosen by
       internal leave-one-out cross-validation, as the ridge baseline of :func:`add_baselines`).
    4. **Decoding**: the predicted scores of the test spots times the basis, plus the training spots' mean
       profile. Genes of ``genes`` that ``reference`` lacks are decoded with loadings fitted on the training
       spots' scores (least squares).

    The function cannot know which sections ``reference`` holds: it refuses a reference that holds a section
    of ``test`` by name (``.obs[library_key]``), but **you must leave the held-out sections' patients out of
    the reference yourself** (serial sections of one tumour share its expression), or the basis sees the test.

    Parameters
    ----------
    train
        Training spots: raw counts in ``.X`` (all genes, for the library size of ``"cp10k"``), the features
        ``.obsm[use_rep]`` and, for the per-section centring, ``.obs[library_key]``. At least 2 rows.
    test
        Spots to predict, with ``.obsm[use_rep]`` of the same width (their expression is not read). Written into.
    genes
        Genes to predict, in ``train.var_names``, e.g. ``model.genes`` of the model they are compared with.
    scale
        Target scale, ``"cp10k"``, ``"log1p"`` or ``"hist2st"`` (see :func:`bitro.tl.fit`); the reference is
        brought to the same scale (for ``"hist2st"`` its library size is summed over the genes it shares).
    use_rep
        Features in ``.obsm`` of both tables, e.g. the color statistics (``"bitro_color"``) or any spot embedding.
    reference
        Expression table (raw counts in ``.X``, ``.obs[library_key]``) the gene basis is fitted on, excluding
        the held-out sections and their patients; ``None``: the training spots.
    n_components
        Number of principal components (gene programmes), between 1 and the number the basis data can give
        (its rows minus its sections, and its genes).
    library_key
        Column of ``.obs`` (of ``train`` and ``reference``) naming each row's section: each section is centred
        on its own mean profile before the basis and the scores are computed. ``None``: no per-section centring.
    key_added
        Written to ``test.obsm[key_added]``.

    Returns
    -------
    The predictions on ``scale``, a :class:`pandas.DataFrame` of ``test`` rows x ``genes``; also written to
    ``test.obsm[key_added]`` (as :func:`bitro.tl.predict` writes its predictions). Score them with
    :func:`bitro.tl.evaluate` (``layer=key_added``, ``scale=``). Nothing is written when an input is refused.

    Examples
    --------
    >>> import bitro as bt
    >>> atlas = bt.datasets.her2st_atlas(path="her2st_atlas")  # doctest: +SKIP
    >>> atlas = atlas[atlas.obs["patient"] != "C"].copy()  # the held-out section C3's patient left out  # doctest: +SKIP
    >>> bt.tl.reduced_rank_ridge(train, test, genes=genes, scale="cp10k", reference=atlas)  # doctest: +SKIP
    >>> bt.tl.evaluate(test, layer="bitro_baseline_rrr", scale="cp10k", key_added="rrr_eval")  # doctest: +SKIP
    """
    from bitro.tl._evaluate import observed_on_scale

    check_scale(scale)
    genes = _gene_names(genes)
    for name, table in (("train", train), ("test", test)):
        _check_anndata(table, name)
    _check_genes_in(train, "train", genes)
    if train.n_obs < 2:
        msg = f"`train` has {train.n_obs} row(s); the reduced-rank ridge needs at least 2 training spots."
        raise ValueError(msg)
    if test.n_obs == 0:
        msg = "`test` has no rows; give the spots to predict."
        raise ValueError(msg)
    if not isinstance(key_added, str) or not key_added:
        msg = f"`key_added` must be a non-empty string, got {key_added!r}."
        raise ValueError(msg)
    inputs = _rrr_inputs(
        train,
        test,
        genes,
        use_rep=use_rep,
        reference=reference,
        n_components=n_components,
        library_key=library_key,
        cap=False,
    )
    train_y = observed_on_scale(train, np.arange(train.n_obs), train.var_names.get_indexer(genes), scale)
    pred = _rrr_predict(train_y, genes, scale, reference, inputs)
    frame = pd.DataFrame(np.asarray(pred, dtype=np.float32), index=test.obs_names, columns=genes)
    test.obsm[key_added] = frame
    return frame


def add_baselines(
    train: AnnData,
    test: AnnData,
    *,
    genes: Sequence[str],
    scale: Scale,
    reference: AnnData | None = None,
    n_components: int = 10,
) -> None:
    """Predict ``test`` with the trivial baselines and the reduced-rank ridge, fitted on ``train``.

    Every accuracy claim should be printed beside these baselines; a model that does not beat them
    has learned nothing from the tissue's morphology:

    - **mean**: the training spots' average expression profile, the same prediction for every spot.
      Its PCC_overall is high (highly expressed genes are high everywhere) but it cannot follow a
      gene across spots: its PCC_gene is 0.
    - **ridge**: a ridge regression (features standardised, ``alpha`` chosen by internal
      cross-validation) from the color statistics of each spot's image patch
      (:func:`bitro.tl.color_statistics`, ``.obsm["bitro_color"]``) to its expression: what a
      trivial image model gets. Fitted only when both tables have these statistics.
    - **rrr**: the reduced-rank ridge (:func:`bitro.tl.reduced_rank_ridge`) on the same color statistics,
      its gene basis fitted on ``reference`` or on the training spots: the strong linear baseline. Fitted
      only when both tables have the statistics.

    Score the predictions written here with :func:`bitro.tl.evaluate` (``layer=``), beside the model's
    own predictions.

    Parameters
    ----------
    train
        Training spots: raw counts in ``.X`` (all genes, for the library size of ``"cp10k"``) and,
        for the ridge baselines, ``.obsm["bitro_color"]`` (and ``.obs["sample"]``, the sections centred
        one by one for the reduced-rank ridge; without it all rows are centred together). At least 2 rows.
    test
        Spots to predict, e.g. a held-out section, with the same genes in ``.var_names`` and, for the
        ridge baselines, ``.obsm["bitro_color"]``. Written into.
    genes
        Genes to predict, e.g. ``model.genes`` of the model they are compared with.
    scale
        Target scale, ``"cp10k"`` (``log1p`` of counts per 10,000, library size over all genes of
        ``.X``), ``"log1p"`` (``log1p`` of raw counts) or ``"hist2st"`` (``log1p`` of counts per 10,000,
        library size over ``genes`` only); use the model's, ``model.scale``.
    reference
        Expression table the reduced-rank ridge's gene basis is fitted on (see
        :func:`bitro.tl.reduced_rank_ridge`; leave the held-out sections' patients out of it); ``None``: the
        training spots.
    n_components
        Components of the reduced-rank ridge; fewer when the basis data cannot give as many.

    Returns
    -------
    Nothing; adds to ``test``:

    - ``.obsm["bitro_baseline_mean"]``: the training-mean profile, on ``scale``, a :class:`pandas.DataFrame`
      of rows x ``genes`` (as :func:`bitro.tl.predict` writes its predictions).
    - ``.obsm["bitro_baseline_ridge"]``: the ridge baseline's predictions, likewise; only when
      both ``train`` and ``test`` have ``.obsm["bitro_color"]``.
    - ``.obsm["bitro_baseline_rrr"]``: the reduced-rank ridge's predictions, likewise, under the same condition
      and when the basis data give a component (more rows than sections).

    Examples
    --------
    >>> import bitro as bt
    >>> bt.tl.color_statistics(sdata)  # doctest: +SKIP
    >>> spots = sdata["spots"]  # doctest: +SKIP
    >>> held_out = (spots.obs["sample"] == "C3").to_numpy()  # doctest: +SKIP
    >>> train, test = spots[~held_out].copy(), spots[held_out].copy()  # doctest: +SKIP
    >>> bt.tl.predict(model, test, cells=sdata["cells"])  # doctest: +SKIP
    >>> bt.tl.add_baselines(train, test, genes=model.genes, scale=model.scale)  # doctest: +SKIP
    >>> for layer in ["bitro_predicted", "bitro_baseline_mean", "bitro_baseline_ridge", "bitro_baseline_rrr"]:  # doctest: +SKIP
    ...     print(layer, bt.tl.evaluate(test, layer=layer, scale=model.scale, library_key=None, key_added=f"{layer}_eval"))
    """
    from bitro.tl._evaluate import observed_on_scale

    check_scale(scale)
    genes = _gene_names(genes)
    for name, table in (("train", train), ("test", test)):
        _check_anndata(table, name)
        _check_genes_in(table, name, genes)
    if train.n_obs < 2:
        msg = f"`train` has {train.n_obs} row(s); the baselines need at least 2 training spots."
        raise ValueError(msg)
    ridge = Key.COLOR_STATS in train.obsm and Key.COLOR_STATS in test.obsm
    if ridge and np.shape(train.obsm[Key.COLOR_STATS])[1] != np.shape(test.obsm[Key.COLOR_STATS])[1]:
        msg = (
            f"`.obsm[{Key.COLOR_STATS!r}]` has {np.shape(train.obsm[Key.COLOR_STATS])[1]} columns in `train` but "
            f"{np.shape(test.obsm[Key.COLOR_STATS])[1]} in `test`; compute both with `bt.tl.color_statistics`."
        )
        raise ValueError(msg)
    rrr = None
    if ridge:
        rrr = _rrr_inputs(
            train,
            test,
            genes,
            use_rep=Key.COLOR_STATS,
            reference=reference,
            n_components=n_components,
            library_key=Key.SAMPLE if Key.SAMPLE in train.obs else None,
            cap=True,
        )

    train_y = observed_on_scale(train, np.arange(train.n_obs), train.var_names.get_indexer(genes), scale)
    preds = {Key.BASELINE_MEAN: np.broadcast_to(train_y.mean(0), (test.n_obs, len(genes)))}
    if ridge:
        x_train, x_test = np.asarray(train.obsm[Key.COLOR_STATS]), np.asarray(test.obsm[Key.COLOR_STATS])
        preds[Key.BASELINE_RIDGE] = ridge_predict(x_train, train_y, x_test)
    if rrr is not None:
        preds[Key.BASELINE_RRR] = _rrr_predict(train_y, genes, scale, reference, rrr)
    for key, pred in preds.items():
        test.obsm[key] = pd.DataFrame(np.asarray(pred, dtype=np.float32), index=test.obs_names, columns=genes)
