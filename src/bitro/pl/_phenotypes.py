"""Cells coloured by phenotype on the tissue."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bitro._constants import Key
from bitro._deprecate import renamed_args
from bitro.pl._spatial import check_figure_args, draw_tissue, finish_figure, frame, new_axes, split_data, tissue

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

#: Fraction of cells on each side that may fall outside the view (stray detections off the tissue).
_TRIM = 0.001


def section_categories(
    adata: AnnData, key: str, rows: np.ndarray, palette: str | list[str] | None
) -> tuple[np.ndarray, list[str], list]:
    """The category codes of ``.obs[key]`` on ``rows`` (-1: missing), the categories and their colours.

    A categorical column keeps its own category order. Colours: ``palette``, else scanpy's ``.uns["{key}_colors"]``,
    else tab10/tab20.
    """
    import matplotlib as mpl

    labels = pd.Categorical(adata.obs[key].to_numpy()[rows])
    if isinstance(adata.obs[key].dtype, pd.CategoricalDtype):
        labels = labels.set_categories(adata.obs[key].cat.categories)
    categories = [str(c) for c in labels.categories]
    codes = np.asarray(labels.codes)
    stored = adata.uns.get(f"{key}_colors")
    if palette is None and stored is not None and len(stored) == len(categories):
        return codes, categories, list(stored)
    if isinstance(palette, list | tuple):
        if len(palette) < len(categories):
            msg = f"`palette` has {len(palette)} colours for {len(categories)} categories of {key!r}; give one per category."
            raise ValueError(msg)
        return codes, categories, list(palette[: len(categories)])
    name = palette if palette is not None else ("tab10" if len(categories) <= 10 else "tab20")
    cmap = mpl.colormaps[name]
    return codes, categories, [cmap(i % cmap.N) for i in range(len(categories))]


@renamed_args(key="phenotype_key")
def phenotypes(
    data: AnnData | SpatialData,
    *,
    sample: str | None = None,
    phenotype_key: str = Key.PHENOTYPE,
    table_key: str = Key.CELLS_TABLE,
    palette: str | list[str] | None = None,
    size: float = 3.0,
    alpha: float = 0.9,
    image_size: int = 1500,
    legend: bool = True,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
    return_fig: bool | None = None,
) -> Axes | Figure | None:
    """Cells coloured by phenotype on the H&E.

    Parameters
    ----------
    data
        A SpatialData with the cell table ``table_key`` and the image ``"{sample}_image"``, or the
        cell table alone (AnnData; drawn without the image).
    sample
        Section to show; may be left out when the table holds one section.
    phenotype_key
        Categorical column of ``.obs`` with the phenotypes.
    table_key
        Cell table of a SpatialData.
    palette
        A matplotlib colour map name or a list of colours, one per category. By default
        ``.uns["{phenotype_key}_colors"]`` when present (scanpy's convention), else ``tab10``/``tab20``.
    size
        Marker area of the cells (points squared).
    alpha
        Opacity of the cells.
    image_size
        The image is read from the coarsest pyramid level that shows the section at least this
        many pixels across.
    legend
        Draw a legend of the phenotypes beside the axes.
    ax
        Axes to draw into; by default a new figure.
    show
        Show the figure (``plt.show()``) and return None, as scanpy's ``show=True``. The default (None, or False)
        returns the axes and leaves showing to Jupyter, which draws the figure at the end of the cell.
    save
        Write the figure, after scanpy's rules: ``True`` to ``{sc.settings.figdir}/phenotypes_{sample}.png``
        (scanpy's ``figdir``, ``plot_suffix`` and ``file_format_figs``); a string is appended to that name and may
        end in the file type (``save="_C3.pdf"`` -> ``figures/phenotypes_{sample}_C3.pdf``); a :class:`pathlib.Path` is the
        file itself.
    return_fig
        Return the :class:`~matplotlib.figure.Figure` instead of the axes.

    Returns
    -------
    The axes; the Figure with ``return_fig=True``; None with ``show=True``.

    Examples
    --------
    >>> import bitro as bt
    >>> bt.pl.phenotypes(sdata, sample="B4")  # doctest: +SKIP
    """
    check_figure_args(show, save, return_fig)
    sdata, cells = split_data(data, table_key)
    if phenotype_key not in cells.obs:
        msg = (
            f"No phenotypes in `.obs[{phenotype_key!r}]` of the cell table (columns: {list(cells.obs.columns)}). "
            "Run `bt.pp.phenotypes` first (K-means on the cell features), or pass `phenotype_key=`."
        )
        raise KeyError(msg)
    t = tissue(cells, sdata, sample)
    codes, categories, colors = section_categories(cells, phenotype_key, t.rows, palette)
    (ax,) = new_axes(1, ax, panel=6.0)
    draw_tissue(ax, t, frame(t.xy, trim=_TRIM), image_size=image_size)
    for i, (cat, color) in enumerate(zip(categories, colors, strict=True)):
        m = codes == i
        ax.scatter(t.xy[m, 0], t.xy[m, 1], s=size, color=color, alpha=alpha, linewidths=0, label=cat)
    if legend:
        ax.legend(
            title=phenotype_key,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            frameon=False,
            markerscale=max(1.0, 12 / size) ** 0.5,
        )
    ax.set_title(f"{phenotype_key}" + (f" — {t.sample}" if t.sample is not None else ""))
    writekey = "phenotypes" + (f"_{t.sample}" if t.sample is not None else "")
    return finish_figure(ax.figure, ax, writekey, show=show, save=save, return_fig=return_fig)
