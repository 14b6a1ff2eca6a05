"""Training and validation curves of a fitted model."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bitro.pl._spatial import check_figure_args, finish_figure, new_axes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Curves whose name contains one of these are scores (higher is better), drawn on a second y axis.
_SCORES = ("pcc", "corr", "r2")


def _member_frame(history: Mapping | pd.DataFrame) -> tuple[pd.DataFrame, int | None]:
    """One member's history as ``(per-epoch frame, best epoch or None)``."""
    best = None
    if isinstance(history, Mapping):
        # per-epoch lists only: scalars ("best_epoch") and metadata (e.g. a transfer's validation sample names) are not curves
        curves = {
            str(k): v
            for k, v in history.items()
            if v is not None and not np.isscalar(v) and not any(isinstance(x, str) for x in v)
        }
        best = history.get("best_epoch")
        try:
            history = pd.DataFrame({k: pd.Series(v, dtype=float) for k, v in curves.items()})
        except (TypeError, ValueError) as e:
            msg = f"The history must map curve names to per-epoch numbers ({e})."
            raise TypeError(msg) from e
    frame = history.select_dtypes("number").drop(columns=["epoch"], errors="ignore")
    if frame.empty or frame.notna().sum().sum() == 0:
        msg = "The training history holds no per-epoch values; fit the model (`bt.tl.fit`) first."
        raise ValueError(msg)
    if "epoch" in history:
        frame.index = pd.Index(history["epoch"].to_numpy(), name="epoch")
    else:
        frame.index = pd.RangeIndex(1, len(frame) + 1, name="epoch")
    return frame, (int(best) if best is not None and np.isfinite(best) and best > 0 else None)


def history_frames(history: Any) -> list[tuple[pd.DataFrame, int | None]]:
    """Per ensemble member: the per-epoch curves (one column each) and the epoch early stopping kept."""
    if hasattr(history, "history") and not isinstance(history, pd.DataFrame | Mapping):
        history = history.history  # a fitted BitroModel: one history per ensemble member
    if isinstance(history, Mapping | pd.DataFrame):
        history = [history]
    if (
        not isinstance(history, Sequence)
        or isinstance(history, str)
        or not history
        or not all(isinstance(h, Mapping | pd.DataFrame) for h in history)
    ):
        msg = (
            "Expected a fitted model (`bt.tl.fit`) with a `.history`, a dict of per-epoch lists, a DataFrame, "
            f"or a list of those (one per ensemble member); got {type(history).__name__}."
        )
        raise TypeError(msg)
    return [_member_frame(h) for h in history]


def training(
    history: Any,
    *,
    log: bool = False,
    best: bool = True,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
    return_fig: bool | None = None,
) -> Axes | Figure | None:
    """Training and validation curves per epoch.

    Losses are drawn on the left axis; scores (curves named like ``"val_pcc_gene"``) on a second
    axis on the right. With an ensemble, every member is drawn (same colour per curve).

    Parameters
    ----------
    history
        A fitted :class:`~bitro.tl.BitroModel`, or a history: a dict of per-epoch lists (a scalar
        ``"best_epoch"`` entry marks the epoch early stopping kept), a DataFrame with one column per
        curve (an ``"epoch"`` column is used as the x axis), or a list of those, one per ensemble member.
    log
        Logarithmic loss axis.
    best
        Mark the epoch early stopping kept: ``"best_epoch"`` when recorded, else the lowest value of
        the first curve whose name starts with ``"val"``.
    ax
        Axes to draw into; by default a new figure.
    show
        Show the figure (``plt.show()``) and return None, as scanpy's ``show=True``. The default (None, or False)
        returns the axes and leaves showing to Jupyter, which draws the figure at the end of the cell.
    save
        Write the figure, after scanpy's rules: ``True`` to ``{sc.settings.figdir}/training.png``
        (scanpy's ``figdir``, ``plot_suffix`` and ``file_format_figs``); a string is appended to that name and may
        end in the file type (``save="_C3.pdf"`` -> ``figures/training_C3.pdf``); a :class:`pathlib.Path` is the
        file itself.
    return_fig
        Return the :class:`~matplotlib.figure.Figure` instead of the axes.

    Returns
    -------
    The axes of the losses (the score axis is its ``twinx``); the Figure with ``return_fig=True``; None with
    ``show=True``.

    Examples
    --------
    >>> import bitro as bt
    >>> bt.pl.training({"train_loss": [1.0, 0.7, 0.6], "val_mse": [1.1, 0.9, 0.95]})  # doctest: +SKIP
    """
    check_figure_args(show, save, return_fig)
    members = history_frames(history)
    (ax,) = new_axes(1, ax, panel=4.5)
    names = list(dict.fromkeys(c for frame, _ in members for c in frame.columns))
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    scores = [n for n in names if any(s in n.lower() for s in _SCORES)]
    ax_score = ax.twinx() if scores else None
    for m, (frame, best_epoch) in enumerate(members):
        for name in frame.columns:
            target = ax_score if name in scores else ax
            y = frame[name].to_numpy()
            if not np.isfinite(y).any():
                continue
            target.plot(
                frame.index,
                y,
                color=colors[name],
                marker="o",
                markersize=2.5,
                linewidth=1.2,
                linestyle="--" if name in scores else "-",
                alpha=1.0 if len(members) == 1 else 0.7,
                label=name if m == 0 else None,
            )
        if best:
            if best_epoch is None:
                val = [c for c in frame.columns if c.lower().startswith("val") and c not in scores]
                best_epoch = frame[val[0]].idxmin() if val and frame[val[0]].notna().any() else None
            if best_epoch is not None:
                ax.axvline(best_epoch, color="0.4", linestyle=":", linewidth=1, label="kept epoch" if m == 0 else None)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    handles, labels = ax.get_legend_handles_labels()
    if ax_score is not None:
        ax_score.set_ylabel("score")
        h2, l2 = ax_score.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
        ax_score.spines[["top"]].set_visible(False)
    ax.legend(handles, labels, frameon=False, fontsize=9)
    ax.set_title("Training" + (f" ({len(members)} ensemble members)" if len(members) > 1 else ""))
    ax.spines[["top"]].set_visible(False)
    if ax_score is None:
        ax.spines[["right"]].set_visible(False)
    return finish_figure(ax.figure, ax, "training", show=show, save=save, return_fig=return_fig)
