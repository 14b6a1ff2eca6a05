"""Distribution of the per-gene correlation written by ``bt.tl.evaluate``."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pandas as pd

from bitro._constants import Key
from bitro.pl._spatial import check_figure_args, finish_figure, new_axes

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData


def gene_pcc(data: AnnData | SpatialData | pd.Series, key: str, table_key: str) -> pd.Series:
    """Per-gene PCC as a Series (gene -> value, undefined genes dropped)."""
    if isinstance(data, pd.Series):
        values = data
    else:
        from bitro.pl._spatial import split_data

        _, adata = split_data(data, table_key)
        col = f"{key}_pcc"
        if col not in adata.var:
            msg = f"No per-gene PCC in `.var[{col!r}]`. Run `bt.tl.evaluate` first (with `key_added={key!r}`)."
            raise KeyError(msg)
        values = adata.var[col]
    values = pd.to_numeric(values, errors="coerce").dropna()
    if values.empty:
        msg = "No gene has a defined PCC (every gene was constant in the truth or not predicted)."
        raise ValueError(msg)
    return values


def metrics(
    data: AnnData | SpatialData | pd.Series,
    *,
    key: str = Key.EVALUATION,
    n_genes: int = 5,
    bins: int = 30,
    table_key: str = Key.SPOTS_TABLE,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
    return_fig: bool | None = None,
) -> Axes | Figure | None:
    """Histogram of the per-gene Pearson correlation (PCC_gene), naming the best and worst genes.

    Parameters
    ----------
    data
        The table scored by :func:`bitro.tl.evaluate` (AnnData, or a SpatialData holding it as
        ``table_key``), or a Series of per-gene PCC indexed by gene.
    key
        The ``key_added`` of :func:`bitro.tl.evaluate`: ``.var["{key}_pcc"]`` is drawn.
    n_genes
        How many of the best and of the worst genes to name.
    bins
        Number of histogram bins.
    table_key
        Spot table of a SpatialData.
    ax
        Axes to draw into; by default a new figure.
    show
        Show the figure (``plt.show()``) and return None, as scanpy's ``show=True``. The default (None, or False)
        returns the axes and leaves showing to Jupyter, which draws the figure at the end of the cell.
    save
        Write the figure, after scanpy's rules: ``True`` to ``{sc.settings.figdir}/metrics.png``
        (scanpy's ``figdir``, ``plot_suffix`` and ``file_format_figs``); a string is appended to that name and may
        end in the file type (``save="_C3.pdf"`` -> ``figures/metrics_C3.pdf``); a :class:`pathlib.Path` is the
        file itself.
    return_fig
        Return the :class:`~matplotlib.figure.Figure` instead of the axes.

    Returns
    -------
    The axes; the Figure with ``return_fig=True``; None with ``show=True``.

    Examples
    --------
    >>> import bitro as bt
    >>> bt.tl.evaluate(adata)  # doctest: +SKIP
    >>> bt.pl.metrics(adata)  # doctest: +SKIP
    """
    check_figure_args(show, save, return_fig)
    if n_genes < 0:
        msg = f"`n_genes` must be 0 or more, got {n_genes}."
        raise ValueError(msg)
    values = gene_pcc(data, key, table_key)
    (ax,) = new_axes(1, ax, panel=4.5)
    r = values.to_numpy(dtype=float)
    span = (min(r.min(), 0.0), max(r.max(), 0.0))  # always show 0, also when every gene scores the same
    ax.hist(r, bins=bins, range=span if span[1] > span[0] else (-1.0, 1.0), color="0.6", edgecolor="white")
    mean = float(values.mean())
    ax.axvline(mean, color="C3", linestyle="--", linewidth=1.5, label=f"mean {mean:.3f}")
    ax.axvline(0, color="0.2", linewidth=0.8)
    ordered = values.sort_values(ascending=False)
    if n_genes:
        best = "\n".join(f"{g}  {v:.2f}" for g, v in ordered.head(n_genes).items())
        worst = "\n".join(f"{g}  {v:.2f}" for g, v in ordered.tail(n_genes)[::-1].items())
        box = {"boxstyle": "round", "facecolor": "white", "alpha": 0.8, "edgecolor": "0.8"}
        ax.text(0.98, 0.97, f"best\n{best}", transform=ax.transAxes, ha="right", va="top", fontsize=9, bbox=box)
        ax.text(0.02, 0.97, f"worst\n{worst}", transform=ax.transAxes, ha="left", va="top", fontsize=9, bbox=box)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.45)
    ax.set_xlabel("Pearson r over spots (PCC_gene)")
    ax.set_ylabel("genes")
    ax.set_title(f"PCC_gene: {len(values)} genes")
    ax.legend(loc="center right", frameon=False, fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    return finish_figure(ax.figure, ax, "metrics", show=show, save=save, return_fig=return_fig)
