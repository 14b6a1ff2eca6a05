"""Tissue regions on the H&E: the label of every spot and its probability."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bitro._constants import Key
from bitro.pl._phenotypes import section_categories
from bitro.pl._spatial import (
    check_figure_args,
    colorbar,
    draw_spots,
    draw_tissue,
    finish_figure,
    frame,
    new_axes,
    split_data,
    spot_radius,
    tissue,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

#: Suffixes of the confidence column next to a region column (``RegionClassifier.predict``,
#: ``ExpressionEncoder.transfer_labels``).
CONFIDENCE_SUFFIXES = ("_probability", "_confidence")


def regions(
    data: AnnData | SpatialData,
    *,
    key: str = Key.REGION_PREDICTED,
    sample: str | None = None,
    table_key: str = Key.SPOTS_TABLE,
    confidence: bool = True,
    palette: str | list[str] | None = None,
    alpha: float = 0.85,
    image_size: int = 1500,
    axs: Sequence[Axes] | None = None,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
    return_fig: bool | None = None,
) -> list[Axes] | Figure | None:
    """Spots coloured by region on the H&E, and the probability of each spot's region beside it.

    Parameters
    ----------
    data
        A SpatialData with the spot table ``table_key`` and the image ``"{sample}_image"``, or the spot table
        alone (AnnData; drawn without the image).
    key
        Categorical ``.obs`` column of the regions: :meth:`bitro.tl.RegionClassifier.predict`'s
        (``"region_predicted"``) or :meth:`bitro.tl.ExpressionEncoder.transfer_labels`'s (``"region_transferred"``).
    sample
        Section to show; may be left out when the table holds one section.
    table_key
        Spot table of a SpatialData.
    confidence
        Add a panel of ``.obs[f"{key}_probability"]`` (or ``f"{key}_confidence"``), when present.
    palette
        A matplotlib colour map name or a list of colours, one per region; by default ``.uns[f"{key}_colors"]``
        when present (scanpy's convention), else ``tab10``.
    alpha
        Opacity of the spots.
    image_size
        The image is read from the coarsest pyramid level that shows the section at least this many pixels across.
    axs
        Axes to draw into (1, or 2 with the confidence panel); by default a new figure.
    show, save, return_fig
        As :func:`bitro.pl.phenotypes` (scanpy's conventions); the file name is ``regions_{sample}``.

    Returns
    -------
    The axes; the Figure with ``return_fig=True``; None with ``show=True``.

    Examples
    --------
    >>> import bitro as bt
    >>> bt.pl.regions(sdata, sample="C3")  # doctest: +SKIP
    """
    check_figure_args(show, save, return_fig)
    sdata, adata = split_data(data, table_key)
    if key not in adata.obs:
        msg = (
            f"No regions in `.obs[{key!r}]` of the spot table (columns: {list(map(str, adata.obs.columns))}); run "
            "`RegionClassifier.predict` (or `ExpressionEncoder.transfer_labels`) first, or pass `key=`."
        )
        raise KeyError(msg)
    conf_key = next((key + s for s in CONFIDENCE_SUFFIXES if key + s in adata.obs), None) if confidence else None
    t = tissue(adata, sdata, sample)
    codes, categories, colors = section_categories(adata, key, t.rows, palette)
    axs = new_axes(1 + int(conf_key is not None), axs)
    radius = spot_radius(adata, t)
    box = frame(t.xy, radius.max())
    ax = axs[0]
    draw_tissue(ax, t, box, image_size=image_size)
    import matplotlib.colors as mcolors
    from matplotlib.patches import Patch

    rgba = np.array([mcolors.to_rgba(c, alpha) for c in colors] + [(0.6, 0.6, 0.6, alpha)])
    coll = draw_spots(ax, t.xy, radius, np.zeros(len(codes)), linewidths=0)
    coll.set_array(None)
    coll.set_facecolors(rgba[np.where(codes < 0, len(colors), codes)])
    ax.legend(
        handles=[Patch(color=c, label=n) for c, n in zip(colors, categories, strict=True)],
        title=key,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        frameon=False,
    )
    ax.set_title(key + (f" — {t.sample}" if t.sample is not None else ""))
    if conf_key is not None:
        ax = axs[1]
        draw_tissue(ax, t, box, image_size=image_size)
        values = pd.to_numeric(adata.obs[conf_key], errors="coerce").to_numpy()[t.rows]
        coll = draw_spots(ax, t.xy, radius, values, cmap="viridis", alpha=alpha, linewidths=0)
        coll.set_clim(0, 1)
        colorbar(ax, coll, conf_key)
        ax.set_title(conf_key)
    writekey = "regions" + (f"_{t.sample}" if t.sample is not None else "")
    return finish_figure(axs[0].figure, axs, writekey, show=show, save=save, return_fig=return_fig)
