"""The trivial baselines every accuracy claim is printed beside.

- the training-mean profile: the same prediction for every spot (high PCC_overall, no PCC_gene);
- ridge regression on color statistics of each spot's image patch (RGB, HSV and optical density:
  mean, std and 10/50/90th percentiles of the pixels inside the spot circle, 45 numbers).

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
from bitro.tl._targets import Scale, check_scale

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


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

    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-1, 4, 11)))
    return model.fit(x_train, y_train).predict(x_test)


def add_baselines(train: AnnData, test: AnnData, *, genes: Sequence[str], scale: Scale) -> None:
    """Predict ``test`` with the two trivial baselines, fitted on ``train``.

    Every accuracy claim should be printed beside these baselines; a model that does not beat them
    has learned nothing from the tissue's morphology:

    - **mean**: the training spots' average expression profile, the same prediction for every spot.
      Its PCC_overall is high (highly expressed genes are high everywhere) but it cannot follow a
      gene across spots: its PCC_gene is 0.
    - **ridge**: a ridge regression (features standardised, ``alpha`` chosen by internal
      cross-validation) from the color statistics of each spot's image patch
      (:func:`bitro.tl.color_statistics`, ``.obsm["bitro_color"]``) to its expression: what a
      trivial image model gets. Fitted only when both tables have these statistics.

    Score the predictions written here with :func:`bitro.tl.evaluate` (``layer=``), beside the model's
    own predictions.

    Parameters
    ----------
    train
        Training spots: raw counts in ``.X`` (all genes, for the library size of ``"cp10k"``) and,
        for the ridge baseline, ``.obsm["bitro_color"]``. At least 2 rows.
    test
        Spots to predict, e.g. a held-out section, with the same genes in ``.var_names`` and, for the
        ridge baseline, ``.obsm["bitro_color"]``. Written into.
    genes
        Genes to predict, e.g. ``model.genes`` of the model they are compared with.
    scale
        Target scale, ``"cp10k"`` (``log1p`` of counts per 10,000, library size over all genes of
        ``.X``) or ``"log1p"`` (``log1p`` of raw counts); use the model's, ``model.scale``.

    Returns
    -------
    Nothing; adds to ``test``:

    - ``.obsm["bitro_baseline_mean"]``: the training-mean profile, on ``scale``, a :class:`pandas.DataFrame`
      of rows x ``genes`` (as :func:`bitro.tl.predict` writes its predictions).
    - ``.obsm["bitro_baseline_ridge"]``: the ridge baseline's predictions, likewise; only when
      both ``train`` and ``test`` have ``.obsm["bitro_color"]``.

    Examples
    --------
    >>> import bitro as bt
    >>> bt.tl.color_statistics(sdata)  # doctest: +SKIP
    >>> spots = sdata["spots"]  # doctest: +SKIP
    >>> held_out = (spots.obs["sample"] == "C3").to_numpy()  # doctest: +SKIP
    >>> train, test = spots[~held_out].copy(), spots[held_out].copy()  # doctest: +SKIP
    >>> bt.tl.predict(model, test, cells=sdata["cells"])  # doctest: +SKIP
    >>> bt.tl.add_baselines(train, test, genes=model.genes, scale=model.scale)  # doctest: +SKIP
    >>> for layer in ["bitro_predicted", "bitro_baseline_mean", "bitro_baseline_ridge"]:  # doctest: +SKIP
    ...     print(layer, bt.tl.evaluate(test, layer=layer, scale=model.scale, library_key=None, key_added=f"{layer}_eval"))
    """
    from bitro.tl._evaluate import observed_on_scale

    check_scale(scale)
    if isinstance(genes, str):
        genes = [genes]
    genes = [str(g) for g in genes]
    if not genes:
        msg = "`genes` is empty; give the genes to predict, e.g. `genes=model.genes`."
        raise ValueError(msg)
    for name, table in (("train", train), ("test", test)):
        missing = [g for g in genes if g not in table.var_names]
        if missing:
            shown = ", ".join(map(repr, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            msg = f"{len(missing)} of the {len(genes)} genes are not in `{name}.var_names`: {shown}."
            raise KeyError(msg)
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

    train_y = observed_on_scale(train, np.arange(train.n_obs), train.var_names.get_indexer(genes), scale)
    preds = {Key.BASELINE_MEAN: np.broadcast_to(train_y.mean(0), (test.n_obs, len(genes)))}
    if ridge:
        preds[Key.BASELINE_RIDGE] = ridge_predict(
            np.asarray(train.obsm[Key.COLOR_STATS]), train_y, np.asarray(test.obsm[Key.COLOR_STATS])
        )
    for key, pred in preds.items():
        test.obsm[key] = pd.DataFrame(np.asarray(pred, dtype=np.float32), index=test.obs_names, columns=genes)
