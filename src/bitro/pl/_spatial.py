"""Shared pieces of the tissue plots: the section's rows, its H&E at a coarse level, spots, scale bar."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bitro._constants import Key
from bitro._logging import logger

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.collections import EllipseCollection
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

#: Margin around the plotted spots or cells, as a fraction of the larger side of their bounding box.
_MARGIN = 0.04


@dataclass
class Tissue:
    """What a tissue plot needs of one section."""

    sample: str | None
    rows: np.ndarray  # row indices of the table in this section
    xy: np.ndarray  # (n, 2) centres in section pixels
    sdata: SpatialData | None
    um_per_px: float | None = None  # the table's record of the pixel size (for the scale bar without an image)


def split_data(data: AnnData | SpatialData, table_key: str) -> tuple[SpatialData | None, AnnData]:
    """``(sdata, table)`` from an AnnData (``sdata`` is None) or from a SpatialData's table ``table_key``."""
    from bitro._utils import get_table

    adata = get_table(data, table_key)
    return (None if adata is data else data), adata


def check_gene(gene: str, names: Sequence[str], where: str) -> None:
    """Raise a :class:`KeyError` naming close matches when ``gene`` is not in ``names``."""
    names = [str(n) for n in names]
    if gene not in set(names):
        close = difflib.get_close_matches(gene, names, n=5)
        hint = f" Did you mean {close}?" if close else ""
        msg = f"Gene {gene!r} not found in {where}.{hint}"
        raise KeyError(msg)


def tissue(adata: AnnData, sdata: SpatialData | None, sample: str | None) -> Tissue:
    """The rows of ``sample`` in ``adata`` and their coordinates, with clear errors for what is missing."""
    if Key.SPATIAL not in adata.obsm:
        msg = (
            f"The table has no spatial coordinates in `.obsm[{Key.SPATIAL!r}]` (obsm: {sorted(adata.obsm) or 'none'}). "
            "Add the spot or cell centres in section pixels, as bitro's readers do."
        )
        raise KeyError(msg)
    if Key.SAMPLE in adata.obs:
        samples = [str(s) for s in dict.fromkeys(adata.obs[Key.SAMPLE].astype(str))]
        if sample is None:
            if len(samples) > 1:
                msg = f"The table holds {len(samples)} samples {samples}; choose one with `sample=`."
                raise ValueError(msg)
            sample = samples[0]
        elif sample not in samples:
            msg = f"Sample {sample!r} not found. Available samples: {samples}."
            raise KeyError(msg)
        rows = np.flatnonzero(adata.obs[Key.SAMPLE].astype(str).to_numpy() == sample)
    else:
        if sample is not None:
            msg = f"`sample={sample!r}` was given but the table has no `.obs[{Key.SAMPLE!r}]` column."
            raise KeyError(msg)
        rows = np.arange(adata.n_obs)
    xy = np.asarray(adata.obsm[Key.SPATIAL])[rows, :2].astype(float)
    return Tissue(sample, rows, xy, sdata, recorded_pixel_size(adata, sample))


def recorded_pixel_size(adata: AnnData, sample: str | None) -> float | None:
    """The pixel size (um/px) of ``sample`` the table records; None if none.

    Cell tables (:func:`bitro.pp.extract_cells`) and the prediction tables of :func:`bitro.tl.predict` record it in
    ``.uns["bitro"]["pixel_size"]``, spot tables of :func:`bitro.io.read_st` in ``.uns["bitro"]["read_st"]``.
    """
    record = adata.uns.get(Key.UNS)
    if not isinstance(record, Mapping):
        return None
    sizes = record.get(Key.PIXEL_SIZE)
    if not isinstance(sizes, Mapping) and isinstance(record.get(Key.READ_ST), Mapping):
        sizes = {s: p.get(Key.PIXEL_SIZE) for s, p in record[Key.READ_ST].items() if isinstance(p, Mapping)}
    if not isinstance(sizes, Mapping) or not sizes:
        return None
    px = sizes.get(sample) if sample is not None else None
    if px is None and len(sizes) == 1:
        px = next(iter(sizes.values()))
    try:
        px = float(px)
    except (TypeError, ValueError):
        return None
    return px if np.isfinite(px) and px > 0 else None


def spot_radius(adata: AnnData, t: Tissue) -> np.ndarray:
    """Radius (pixels) of each spot of ``t``.

    From the circles ``"{sample}_spots"`` (or the virtual spots ``"{sample}_virtual_spots"``) of the
    SpatialData when they hold the table's spots; otherwise a quarter of the median spacing to the
    nearest spot (the diameter-to-pitch ratio of legacy ST and Visium).
    """
    names = [Key.spots(t.sample), Key.virtual_spots(t.sample)] if t.sample is not None else []
    if Key.REGION in adata.obs and len(t.rows):
        names.insert(0, str(adata.obs[Key.REGION].iloc[t.rows[0]]))
    found_in = next((n for n in names if t.sdata is not None and n in t.sdata.shapes), None)
    if found_in is not None:
        shapes = t.sdata.shapes[found_in]
        ids = (
            adata.obs[Key.SPOT_ID].astype(str).to_numpy()[t.rows]
            if Key.SPOT_ID in adata.obs
            else adata.obs_names[t.rows].astype(str)
        )
        radius = shapes["radius"].copy()
        radius.index = radius.index.astype(str)
        found = radius.reindex(ids)
        if found.notna().all():
            return found.to_numpy(dtype=float)
        logger.warning("Some spots of the table are not in %r; estimating spot radii from their spacing.", found_in)
    if len(t.xy) < 2:
        return np.full(len(t.xy), 1.0)
    from scipy.spatial import cKDTree

    d, _ = cKDTree(t.xy).query(t.xy, k=2)
    return np.full(len(t.xy), 0.25 * float(np.median(d[:, 1])))


def frame(xy: np.ndarray, pad: np.ndarray | float = 0.0, *, trim: float = 0.0) -> tuple[float, float, float, float]:
    """``(x0, x1, y0, y1)`` around the points, padded by their radius and a small margin.

    ``trim`` is the fraction of points allowed outside on each side (stray detections off the tissue).
    """
    pad = np.broadcast_to(np.asarray(pad, float), (len(xy),))
    x0, x1 = float(np.quantile(xy[:, 0] - pad, trim)), float(np.quantile(xy[:, 0] + pad, 1 - trim))
    y0, y1 = float(np.quantile(xy[:, 1] - pad, trim)), float(np.quantile(xy[:, 1] + pad, 1 - trim))
    m = _MARGIN * max(x1 - x0, y1 - y0, 1.0)
    return x0 - m, x1 + m, y0 - m, y1 + m


def image_key(sdata: SpatialData, sample: str | None) -> str | None:
    """The H&E image of the section; None when unclear.

    ``"{sample}_image"``, else the section's image as :func:`bitro.io.get_sections` finds it, else the only image.
    """
    if sample is not None and Key.image(sample) in sdata.images:
        return Key.image(sample)
    if sample is not None:  # other layouts, e.g. spatialdata-io's "{id}_full_image"
        from bitro.io import get_sections

        try:
            return get_sections(sdata, samples=[sample])[0].image_key
        except (KeyError, ValueError, IndexError):
            pass
    if len(sdata.images) == 1:
        return next(iter(sdata.images))
    logger.warning("No image %r in the SpatialData; plotting without the H&E.", Key.image(str(sample)))
    return None


def image_crop(image, box: tuple[float, float, float, float], image_size: int) -> tuple[np.ndarray, list[float]]:
    """The window ``box`` (section pixels) of the coarsest pyramid level at least ``image_size`` px across.

    Returns the ``(y, x, c)`` array and its matplotlib ``extent`` in section (full-resolution) pixels.
    """
    import xarray as xr

    levels = [next(iter(image[k].values())) for k in image] if isinstance(image, xr.DataTree) else [image]
    x0, x1, y0, y1 = box
    full_w = levels[0].sizes["x"]
    chosen = levels[0]
    for level in levels:  # finest to coarsest
        factor = full_w / level.sizes["x"]
        if max(x1 - x0, y1 - y0) / factor >= image_size:
            chosen = level
        else:
            break
    crop = chosen.sel(x=slice(x0, x1), y=slice(y0, y1))
    step = full_w / chosen.sizes["x"]
    xs, ys = crop["x"].values, crop["y"].values
    extent = [xs[0] - step / 2, xs[-1] + step / 2, ys[-1] + step / 2, ys[0] - step / 2]
    rgb = np.moveaxis(np.asarray(crop.transpose("c", "y", "x").values), 0, -1)[..., :3]
    return rgb, extent


def draw_tissue(ax: Axes, t: Tissue, box: tuple[float, float, float, float], *, image_size: int) -> None:
    """The H&E (when there is one) under ``box``, frameless axes in section pixels, y pointing down, scale bar."""
    px = None
    if t.sdata is not None:
        key = image_key(t.sdata, t.sample)
        if key is not None:
            from bitro._utils import image_offset, pixel_size

            dx, dy = image_offset(t.sdata.images[key])
            x0, x1, y0, y1 = box
            rgb, extent = image_crop(t.sdata.images[key], (x0 - dx, x1 - dx, y0 - dy, y1 - dy), image_size)
            extent = [extent[0] + dx, extent[1] + dx, extent[2] + dy, extent[3] + dy]
            ax.imshow(rgb, extent=extent, interpolation="antialiased", zorder=0)
            try:
                px = pixel_size(t.sdata, key)
            except ValueError:
                logger.info("No pixel size recorded for %r; no scale bar.", key)
    if px is None:
        px = t.um_per_px
    x0, x1, y0, y1 = box
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_aspect("equal")
    ax.set_axis_off()
    if px is not None:
        scale_bar(ax, px, x1 - x0)


def nice_length(target: float) -> float:
    """The largest of 1, 2, 5 x 10^k not above ``target``."""
    exp = 10.0 ** np.floor(np.log10(target))
    return float(max(m * exp for m in (1, 2, 5) if m * exp <= target))


def scale_bar(ax: Axes, um_per_px: float, width_px: float) -> None:
    """A scale bar of a round length near a fifth of the view, labelled in um or mm."""
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    um = nice_length(width_px * um_per_px / 5)
    label = f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} µm"
    bar = AnchoredSizeBar(
        ax.transData,
        um / um_per_px,
        label,
        "lower right",
        pad=0.4,
        color="black",
        frameon=False,
        size_vertical=width_px / 150,
        label_top=True,
    )
    ax.add_artist(bar)


def draw_spots(ax: Axes, xy: np.ndarray, radius: np.ndarray, values: np.ndarray, **kwargs) -> EllipseCollection:
    """Filled circles of their true radius (data units), coloured by ``values``."""
    from matplotlib.collections import EllipseCollection

    coll = EllipseCollection(
        widths=2 * radius,
        heights=2 * radius,
        angles=0,
        units="xy",
        offsets=xy,
        offset_transform=ax.transData,
        **kwargs,
    )
    coll.set_array(np.asarray(values, float))
    ax.add_collection(coll)
    return coll


def colorbar(ax: Axes, mappable, label: str | None = None):
    """A slim colourbar beside ``ax``."""
    cb = ax.figure.colorbar(mappable, ax=ax, fraction=0.046, pad=0.02, shrink=0.8)
    if label:
        cb.set_label(label)
    return cb


def new_axes(n: int, axs: Sequence[Axes] | Axes | None, panel: float = 4.5) -> list[Axes]:
    """``n`` axes side by side: the ones given (checked) or a new figure."""
    import matplotlib.pyplot as plt

    if axs is None:
        _, created = plt.subplots(1, n, figsize=(panel * n + 0.8 * n, panel), squeeze=False, layout="constrained")
        return list(created[0])
    axs = [axs] if not isinstance(axs, Sequence | np.ndarray) else list(np.ravel(axs))
    if len(axs) != n:
        msg = f"This plot draws {n} panel(s) but {len(axs)} axes were given; pass {n} axes or none."
        raise ValueError(msg)
    return axs


def shared_limits(
    values: Sequence[np.ndarray], vmin: float | None, vmax: float | None
) -> tuple[float | None, float | None]:
    """One colour scale over all ``values`` (finite ones): ``(vmin, vmax)``, each given one kept."""
    finite = [np.asarray(v, float)[np.isfinite(v)] for v in values]
    finite = [v for v in finite if v.size]
    if not finite:
        return vmin, vmax
    lo = float(min(v.min() for v in finite)) if vmin is None else vmin
    hi = float(max(v.max() for v in finite)) if vmax is None else vmax
    return lo, hi


def check_figure_args(show: bool | None, save: bool | str | os.PathLike | None, return_fig: bool | None) -> None:
    """Clear errors for ``show``, ``save`` and ``return_fig`` before anything is drawn."""
    for name, value in (("show", show), ("return_fig", return_fig)):
        if value is not None and not isinstance(value, bool | np.bool_):
            msg = f"`{name}` must be True, False or None, got {value!r}."
            raise TypeError(msg)
    if save is not None and not isinstance(save, bool | np.bool_ | str | os.PathLike):
        msg = f"`save` must be True, False, a file name suffix (str) or a path (pathlib.Path), got {save!r}."
        raise TypeError(msg)
    if isinstance(save, str) and not save:
        msg = "`save` is an empty string; use `save=True` for the default file name."
        raise ValueError(msg)


#: File types matplotlib writes that a ``save`` string may end with (scanpy infers .pdf/.png/.svg the same way).
_FIGURE_TYPES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".tif", ".tiff", ".eps", ".ps")


def figure_path(writekey: str, save: bool | str | os.PathLike) -> Path:
    """Where ``save`` writes the figure, after scanpy's rules.

    ``True``: ``{sc.settings.figdir}/{writekey}{sc.settings.plot_suffix}.{sc.settings.file_format_figs}``; a string:
    appended to ``writekey`` in the same folder, its file type taken from its ending (``"_C3.pdf"`` ->
    ``figures/expression_ERBB2_C3.pdf``); a :class:`pathlib.Path` (any ``os.PathLike``): that file, as given.
    """
    import scanpy as sc

    if isinstance(save, os.PathLike):
        path = Path(save)
        return path if path.suffix else path.with_suffix(f".{sc.settings.file_format_figs}")
    ext = sc.settings.file_format_figs
    if isinstance(save, str):
        ending = next((e for e in _FIGURE_TYPES if save.lower().endswith(e)), None)
        if ending is not None:
            ext, save = ending[1:], save[: -len(ending)]
        writekey = f"{writekey}{save}"
    return Path(sc.settings.figdir) / f"{writekey}{sc.settings.plot_suffix}.{ext}"


def finish_figure(
    fig: Figure,
    result,
    writekey: str,
    *,
    show: bool | None,
    save: bool | str | os.PathLike | None,
    return_fig: bool | None,
):
    """Save and show a finished figure after scanpy's conventions; what the plot function returns.

    ``save`` writes the figure (:func:`figure_path`); ``return_fig=True`` returns the Figure; ``show=True`` shows it
    (``plt.show``) and returns None; otherwise (``show`` None or False, bitro's default) ``result``, the axes.
    """
    import matplotlib as mpl
    import matplotlib.pyplot as plt

    if save:
        path = figure_path(writekey, save)
        path.parent.mkdir(parents=True, exist_ok=True)
        dpi = mpl.rcParams["savefig.dpi"]
        dpi = max(150.0, float(fig.dpi)) if isinstance(dpi, str) or dpi < 150 else dpi  # readable files
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        logger.info("Saved the figure to %s.", path)
    if return_fig:
        return fig
    if show:
        plt.show()
        return None
    return result
