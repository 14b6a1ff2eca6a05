"""The trivial baselines every accuracy claim is printed beside.

- the training-mean profile: the same prediction for every spot (high PCC_overall, no PCC_gene);
- ridge regression on colour statistics of each spot's image patch (RGB, HSV and optical density:
  mean, std and 10/50/90th percentiles of the pixels inside the spot circle, 45 numbers).

A model that does not beat them has learned nothing from morphology.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from bitro._constants import Key
from bitro._settings import settings
from bitro._utils import check_key, image_offset, scale0

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def colour_features(pixels: np.ndarray) -> np.ndarray:
    """Colour statistics of RGB pixels ``(n, 3)`` uint8: RGB, HSV and optical density; mean, std, percentiles."""
    from skimage.color import rgb2hsv

    rgb = pixels.reshape(-1, 3).astype(np.float64) / 255.0
    hsv = rgb2hsv(rgb.reshape(-1, 1, 3)).reshape(-1, 3)
    od = -np.log(np.clip(rgb, 1 / 255, 1))
    out = []
    for v in (rgb, hsv, od):
        out += [v.mean(0), v.std(0), *np.percentile(v, [10, 50, 90], axis=0)]
    return np.concatenate(out)


def colour_statistics(
    sdata: SpatialData, *, table_key: str = Key.SPOTS_TABLE, key_added: str = Key.COLOUR_STATS
) -> np.ndarray:
    """Colour statistics of the image patch under every spot, for the ridge baseline.

    Parameters
    ----------
    sdata
        SpatialData with the section images, spot circles and the spot table.
    table_key
        The spot table.
    key_added
        Written to ``sdata[table_key].obsm[key_added]``.

    Returns
    -------
    The statistics, spots x 45 (also written to the table).
    """
    from bitro.io import get_sections

    check_key(sdata.tables, table_key, "Table")
    table = sdata.tables[table_key]
    sections = {s.sample: s for s in get_sections(sdata) if s.spots_key is not None}
    samples = table.obs[Key.SAMPLE].astype(str).to_numpy()
    missing = sorted(set(samples) - set(sections))
    if missing:
        msg = f"No image with spots for samples {missing} of table {table_key!r}; sections found: {sorted(sections)}."
        raise ValueError(msg)
    stats = np.zeros((table.n_obs, 45))
    spot_ids = table.obs[Key.SPOT_ID].astype(str).to_numpy()
    for sample in tqdm(list(dict.fromkeys(samples)), desc="colour statistics", disable=not settings.progress):
        section = sections[sample]
        image = scale0(sdata.images[section.image_key])
        circles = sdata.shapes[section.spots_key]
        rows = np.flatnonzero(samples == sample)
        found = circles.index.astype(str).get_indexer(spot_ids[rows])
        if (found < 0).any():
            msg = f"Spots {list(spot_ids[rows][found < 0][:5])} of table {table_key!r} are not in {section.spots_key!r}."
            raise ValueError(msg)
        dx, dy = image_offset(sdata.images[section.image_key], section.coordinate_system)  # a cropped image
        xs, ys = circles.geometry.x.to_numpy()[found] - dx, circles.geometry.y.to_numpy()[found] - dy
        radii = circles["radius"].to_numpy()[found]
        for row, x, y, r in zip(rows, xs, ys, radii, strict=True):
            x0, y0 = max(int(x - r), 0), max(int(y - r), 0)
            crop = image.isel(y=slice(y0, int(y + r) + 1), x=slice(x0, int(x + r) + 1)).transpose("y", "x", "c").values
            yy, xx = np.mgrid[: crop.shape[0], : crop.shape[1]]
            inside = (xx + x0 + 0.5 - x) ** 2 + (yy + y0 + 0.5 - y) ** 2 <= r**2
            stats[row] = colour_features(crop[inside])
    table.obsm[key_added] = stats
    return stats


def ridge_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """Standardise, fit ridge regression (alpha chosen by internal cross-validation), predict."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-1, 4, 11)))
    return model.fit(x_train, y_train).predict(x_test)


def add_baselines(train: AnnData, test: AnnData, *, genes: list[str], scale: str) -> None:
    """Write the baselines' predictions for ``test`` into its layers, fitted on ``train``.

    ``.layers["bitro_baseline_mean"]`` (the training-mean profile) and, when both tables have
    ``.obsm["bitro_colour"]`` (:func:`colour_statistics`), ``.layers["bitro_baseline_ridge"]``;
    on ``scale`` (``"cp10k"`` or ``"log1p"`` of the raw counts in ``.X``), for ``genes``, NaN elsewhere.
    """
    from bitro.tl._targets import dense, to_scale

    cols = test.var_names.get_indexer(genes)
    train_y = to_scale(dense(train.X), scale)[:, train.var_names.get_indexer(genes)]
    preds = {Key.BASELINE_MEAN: np.broadcast_to(train_y.mean(0), (test.n_obs, len(genes)))}
    if Key.COLOUR_STATS in train.obsm and Key.COLOUR_STATS in test.obsm:
        preds[Key.BASELINE_RIDGE] = ridge_predict(train.obsm[Key.COLOUR_STATS], train_y, test.obsm[Key.COLOUR_STATS])
    for key, pred in preds.items():
        layer = np.full(test.shape, np.nan, dtype=np.float32)
        layer[:, cols] = pred
        test.layers[key] = layer
