"""Observed vs predicted expression of one gene on the tissue."""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from bitro._constants import Key
from bitro._deprecate import renamed_args
from bitro.pl._spatial import (
    check_figure_args,
    check_gene,
    colorbar,
    draw_spots,
    draw_tissue,
    finish_figure,
    frame,
    new_axes,
    shared_limits,
    split_data,
    spot_radius,
    tissue,
)
from bitro.tl._targets import dense

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

#: Colourbar labels of the target scales.
SCALE_LABELS = {"cp10k": "log1p CP10k", "log1p": "log1p counts", "hist2st": "log1p CP10k of the predicted genes"}


def _predicted_cells(sdata: SpatialData | None, gene: str, sample: str | None, cells_key: str):
    if sdata is None or cells_key not in sdata.tables:
        where = "an AnnData" if sdata is None else f"a SpatialData without table {cells_key!r}"
        msg = (
            f"`cells=True` needs the SpatialData holding the cell expression table {cells_key!r} "
            f"(written by `bt.tl.predict`); got {where}."
        )
        raise ValueError(msg)
    expr = sdata.tables[cells_key]
    check_gene(gene, expr.var_names, f"the cell expression table {cells_key!r}")
    t = tissue(expr, sdata, sample)
    values = dense(expr.X[t.rows][:, [int(expr.var_names.get_loc(gene))]])[:, 0]
    keep = np.flatnonzero(np.isfinite(values))
    keep = keep[np.argsort(values[keep], kind="stable")]  # highest on top
    return t.xy[keep], values[keep]


def pearson(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """Pearson r over the pairs where both are finite, and their number (r is NaN below 3 pairs or when constant)."""
    both = np.isfinite(x) & np.isfinite(y)
    x, y = np.asarray(x, float)[both], np.asarray(y, float)[both]
    n = int(both.sum())
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), n
    return float(np.corrcoef(x, y)[0, 1]), n


@renamed_args(cells_table_key="cells_key")
def expression(
    data: AnnData | SpatialData,
    gene: str,
    *,
    sample: str | None = None,
    layer: str = Key.PREDICTED,
    cells: bool = False,
    scale: str | None = None,
    table_key: str = Key.SPOTS_TABLE,
    cells_key: str = Key.PREDICTED_CELLS_TABLE,
    share_scale: bool = True,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.85,
    cell_size: float = 4.0,
    image_size: int = 1500,
    axs: Sequence[Axes] | None = None,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
    return_fig: bool | None = None,
) -> list[Axes] | Figure | None:
    """Observed and predicted expression of a gene, side by side on the H&E.

    Spots are drawn as filled circles of their true radius over the section's image (a coarse
    pyramid level), coloured by the observed expression brought to the scale of the predictions
    (see :func:`bitro.tl.evaluate`) and by the prediction. By default every panel uses one colour scale, from the
    lowest to the highest value drawn in any panel, so that a prediction narrower than the observed range (the
    shrinkage of a regression towards the mean) shows as a paler map; each panel has a labelled colourbar and,
    when the pixel size is known, a scale bar. The predicted panel's title gives the Pearson correlation of the
    predicted with the observed values over this section's spots (the section's PCC_gene of this gene, see
    :func:`bitro.tl.evaluate`). A slide without measured expression is drawn from the prediction table of
    :func:`bitro.tl.predict` (``table_key="bitro_spots"``: the virtual spots), without the observed panel.

    Parameters
    ----------
    data
        A SpatialData with the spot table ``table_key`` and the image ``"{sample}_image"``, or the
        spot table alone (AnnData; drawn without the image, with spot radii estimated from their spacing).
    gene
        Gene to show.
    sample
        Section to show; may be left out when the table holds one section.
    layer
        Where the spot table holds the predictions: ``.obsm[layer]`` (:func:`bitro.tl.predict`) or a layer.
    cells
        Add a panel with the predicted cell expression of the table ``cells_key`` (written by
        :func:`bitro.tl.predict`) as points, highest values drawn on top.
    scale
        Scale of the predictions, ``"cp10k"``, ``"log1p"`` or ``"hist2st"``; by default the one recorded by
        :func:`bitro.tl.predict`.
    table_key
        Spot table of a SpatialData.
    cells_key
        Cell expression table of a SpatialData, used with ``cells=True``.
    share_scale
        One colour scale for all panels (default). ``False``: each panel its own, from its minimum to its maximum
        (shows the pattern of a prediction whatever its range, hides how much narrower it is than the observed).
    cmap
        Colour map.
    vmin
        Lower end of every colour scale (default: the lowest value drawn, over all panels with ``share_scale``).
    vmax
        Upper end of every colour scale (default: the highest value drawn, over all panels with ``share_scale``).
    alpha
        Opacity of the spots and cells.
    cell_size
        Marker area of the cells (points squared).
    image_size
        The image is read from the coarsest pyramid level that shows the section at least this
        many pixels across.
    axs
        Axes to draw into (2, or 3 with ``cells=True``; one fewer without observed expression); by default a new
        figure.
    show
        Show the figure (``plt.show()``) and return None, as scanpy's ``show=True``. The default (None, or False)
        returns the axes and leaves showing to Jupyter, which draws the figure at the end of the cell.
    save
        Write the figure, after scanpy's rules: ``True`` to ``{sc.settings.figdir}/expression_{gene}.png``
        (scanpy's ``figdir``, ``plot_suffix`` and ``file_format_figs``); a string is appended to that name and may
        end in the file type (``save="_C3.pdf"`` -> ``figures/expression_ERBB2_C3.pdf``); a
        :class:`pathlib.Path` is the file itself.
    return_fig
        Return the :class:`~matplotlib.figure.Figure` instead of the axes.

    Returns
    -------
    The axes: observed, predicted (and predicted cells); the Figure with ``return_fig=True``; None with
    ``show=True``.

    Examples
    --------
    >>> import bitro as bt
    >>> bt.pl.expression(sdata, "EPCAM", sample="B4", cells=True)  # doctest: +SKIP
    >>> bt.pl.expression(sdata, "ERBB2", sample="C3", share_scale=False, save="_C3.pdf")  # doctest: +SKIP
    """
    from bitro.tl._evaluate import observed_on_scale, prediction_matrix, prediction_record, prediction_scale

    check_figure_args(show, save, return_fig)
    if not isinstance(share_scale, bool | np.bool_):
        msg = f"`share_scale` must be True (one colour scale for all panels) or False, got {share_scale!r}."
        raise TypeError(msg)
    if vmin is not None and vmax is not None and not vmin < vmax:
        msg = f"`vmin` ({vmin}) must be below `vmax` ({vmax})."
        raise ValueError(msg)
    sdata, adata = split_data(data, table_key)
    in_x = prediction_record(adata, Key.PREDICTIONS_IN_X) is not None
    if in_x:
        # a prediction table of `bt.tl.predict` (e.g. "bitro_spots"): predictions in .X, nothing observed
        check_gene(gene, adata.var_names, "the prediction table")
        cols, pred_all, observed_too = np.arange(adata.n_vars), None, False
    else:
        check_gene(gene, adata.var_names, "the spot table")
        cols, pred_all = prediction_matrix(adata, layer)
        observed_too = True
    g = int(adata.var_names.get_loc(gene))
    if g not in set(cols.tolist()):
        names = [str(x) for x in adata.var_names[cols]]
        shown = difflib.get_close_matches(gene, names, n=5) or names[:10]
        msg = (
            f"Gene {gene!r} has no prediction in {layer!r} ({len(names)} genes have one, e.g. {shown}). "
            "Fit the model on this gene (`bt.tl.fit(..., genes=...)`) and run `bt.tl.predict`."
        )
        raise KeyError(msg)
    scale = prediction_scale(adata, scale, Key.PREDICTIONS_IN_X if in_x else layer)
    t = tissue(adata, sdata, sample)
    cell_xy = cell_values = None
    if cells:
        cell_xy, cell_values = _predicted_cells(sdata, gene, t.sample, cells_key)
    radius = spot_radius(adata, t)
    if pred_all is None:
        predicted = dense(adata.X[t.rows][:, [g]])[:, 0]
    else:
        predicted = pred_all[t.rows, int(np.flatnonzero(cols == g)[0])]
    axs = new_axes(int(observed_too) + 1 + int(cells), axs, panel=5.0)
    box = frame(t.xy, radius.max())
    label = SCALE_LABELS.get(scale, scale)
    has = np.isfinite(predicted)
    panels = [("predicted", t.xy[has], radius[has], predicted[has])]
    if observed_too:
        panels.insert(
            0, ("observed", t.xy, radius, observed_on_scale(adata, t.rows, np.array([g]), scale, library=cols)[:, 0])
        )
    lo, hi = vmin, vmax
    if share_scale:
        lo, hi = shared_limits([p[3] for p in panels] + ([cell_values] if cells else []), vmin, vmax)
    for ax, (what, xy, r, values) in zip(axs, panels, strict=False):
        draw_tissue(ax, t, box, image_size=image_size)
        coll = draw_spots(ax, xy, r, values, cmap=cmap, alpha=alpha, linewidths=0)
        coll.set_clim(lo, hi)
        colorbar(ax, coll, label)
        ax.set_title(f"{gene} — {what}")
    if observed_too:
        r, n = pearson(panels[0][3][has], predicted[has])
        shown = f"Pearson r = {r:.2f}" if np.isfinite(r) else "Pearson r undefined"
        axs[1].set_title(f"{gene} — predicted\n{shown} over {n} spots")
    if cells:
        ax = axs[len(panels)]
        draw_tissue(ax, t, box, image_size=image_size)
        sc = ax.scatter(
            cell_xy[:, 0],
            cell_xy[:, 1],
            c=cell_values,
            s=cell_size,
            cmap=cmap,
            alpha=alpha,
            linewidths=0,
            vmin=lo,
            vmax=hi,
        )
        colorbar(ax, sc, f"cell, {label}")
        ax.set_title(f"{gene} — predicted cells")
    return finish_figure(axs[0].figure, axs, f"expression_{gene}", show=show, save=save, return_fig=return_fig)
