"""Reader for legacy Spatial Transcriptomics (ST) sections, as published for HER2ST."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bitro._constants import Key
from bitro._logging import logger

if TYPE_CHECKING:
    import xarray as xr
    from anndata import AnnData
    from geopandas import GeoDataFrame
    from spatialdata import SpatialData

#: Image file names tried for a section ``S``, in order.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
_SPOT_ID = re.compile(r"^\d+x\d+$")


@dataclass
class STFiles:
    """The three files of one legacy ST section."""

    counts: Path
    coordinates: Path
    image: Path


def st_files(path: Path, sample: str) -> STFiles:
    """Locate ``{sample}.tsv.gz``, ``{sample}_selection.tsv`` and ``{sample}.jpg`` in ``path``, or raise."""
    if not path.is_dir():
        msg = f"{str(path)!r} is not a directory; `path` must be the folder that holds the files of section {sample!r}."
        raise FileNotFoundError(msg)
    counts, coordinates = path / f"{sample}.tsv.gz", path / f"{sample}_selection.tsv"
    images = [path / f"{sample}{s}" for s in IMAGE_SUFFIXES if (path / f"{sample}{s}").is_file()]
    missing = [str(p.name) for p in (counts, coordinates) if not p.is_file()]
    if not images:
        missing.append(f"{sample}.jpg")
    if missing:
        msg = (
            f"Section {sample!r} in {str(path)!r} is missing {missing}. A legacy ST section needs the counts "
            f"'{sample}.tsv.gz', the spot coordinates '{sample}_selection.tsv' and the H&E image '{sample}.jpg'."
        )
        raise FileNotFoundError(msg)
    return STFiles(counts, coordinates, images[0])


def _read_coordinates(file: Path) -> pd.DataFrame:
    try:
        coords = pd.read_csv(file, sep="\t")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        msg = f"Cannot parse the spot coordinates {str(file)!r}: {e}."
        raise ValueError(msg) from e
    need = {"x", "y", "pixel_x", "pixel_y"}
    if not need <= set(coords.columns):
        msg = (
            f"The spot coordinates {str(file)!r} lack the columns {sorted(need - set(coords.columns))} "
            f"(found {list(coords.columns)}); a legacy ST selection file has x, y, pixel_x, pixel_y."
        )
        raise ValueError(msg)
    if coords[list(need)].isna().any().any():
        msg = f"The spot coordinates {str(file)!r} contain missing values in x, y, pixel_x or pixel_y."
        raise ValueError(msg)
    coords.index = coords["x"].astype(int).astype(str) + "x" + coords["y"].astype(int).astype(str)
    if coords.index.duplicated().any():
        dup = list(coords.index[coords.index.duplicated()][:5])
        msg = f"The spot coordinates {str(file)!r} list some spots twice (e.g. {dup})."
        raise ValueError(msg)
    return coords


def _read_counts(file: Path) -> pd.DataFrame:
    try:
        counts = pd.read_csv(file, sep="\t", index_col=0)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError) as e:
        msg = f"Cannot parse the counts {str(file)!r}: {e}."
        raise ValueError(msg) from e
    counts.index = counts.index.astype(str)
    bad = [i for i in counts.index[:1000] if not _SPOT_ID.match(i)]
    if bad or counts.shape[1] == 0:
        msg = (
            f"The counts {str(file)!r} are not spots x genes with row names '{{x}}x{{y}}' "
            f"(first row names: {list(counts.index[:3])}, {counts.shape[1]} columns)."
        )
        raise ValueError(msg)
    if not all(pd.api.types.is_numeric_dtype(t) for t in counts.dtypes.unique()):
        msg = f"The counts {str(file)!r} hold non-numeric values; expected raw UMI counts."
        raise ValueError(msg)
    if counts.index.duplicated().any():
        dup = list(counts.index[counts.index.duplicated()][:5])
        msg = f"The counts {str(file)!r} list some spots twice (e.g. {dup})."
        raise ValueError(msg)
    return counts


def fit_pixel_size(coords: pd.DataFrame, *, array_pitch_um: float, file: Path | str = "") -> float:
    """Micrometres per pixel from a least-squares fit of pixel centres on array coordinates.

    Uses the adjusted array coordinates ``new_x``/``new_y`` when present (they match the pixel
    centres exactly), else ``x``/``y``. One array step is ``array_pitch_um`` micrometres.
    """
    cols = ["new_x", "new_y"] if {"new_x", "new_y"} <= set(coords.columns) else ["x", "y"]
    design = np.c_[coords[cols].to_numpy(float), np.ones(len(coords))]
    if len(coords) < 3 or np.linalg.matrix_rank(design) < 3:
        msg = (
            f"Cannot measure the pixel size from the spots of {str(file)!r}: they need at least 3 spots that are not "
            "on one line. Pass `pixel_size=` (micrometres per pixel)."
        )
        raise ValueError(msg)
    coef, *_ = np.linalg.lstsq(design, coords[["pixel_x", "pixel_y"]].to_numpy(float), rcond=None)
    px_per_step = float(np.sqrt(abs(np.linalg.det(coef[:2]))))
    if not np.isfinite(px_per_step) or px_per_step <= 0:
        msg = f"The spot coordinates of {str(file)!r} give no usable pixel size; pass `pixel_size=`."
        raise ValueError(msg)
    return array_pitch_um / px_per_step


def read_st_section(
    path: Path, sample: str, *, pixel_size: float | None, spot_diameter_um: float, array_pitch_um: float
) -> tuple[xr.DataTree, GeoDataFrame, AnnData, dict]:
    """Image, spots and the per-section spot AnnData of one legacy ST section (see :func:`read_st`)."""
    import anndata as ad
    import scipy.sparse as sp

    from bitro.io._build import IMAGE_CHUNK, pyramid_image_element, spots_element
    from bitro.io._lazy_image import lazy_rgb_pyramid

    for name, value in (("spot_diameter_um", spot_diameter_um), ("array_pitch_um", array_pitch_um)):
        if not np.isfinite(value) or value <= 0:
            msg = f"`{name}` must be a positive number of micrometres, got {value!r}."
            raise ValueError(msg)
    if pixel_size is not None and (not np.isfinite(pixel_size) or pixel_size <= 0):
        msg = f"`pixel_size` must be a positive number of micrometres per pixel, got {pixel_size!r}."
        raise ValueError(msg)

    files = st_files(Path(path), sample)
    levels = lazy_rgb_pyramid(files.image, chunk=IMAGE_CHUNK)  # reads the header only
    _, height, width = levels[0].shape
    coords = _read_coordinates(files.coordinates)
    counts = _read_counts(files.counts)

    shared = coords.index.intersection(counts.index, sort=False)
    if len(shared) == 0:
        msg = (
            f"The counts {str(files.counts)!r} and the coordinates {str(files.coordinates)!r} share no spot "
            f"(counts: {list(counts.index[:3])}..., coordinates: {list(coords.index[:3])}...). Do they belong to "
            "the same section?"
        )
        raise ValueError(msg)
    n_counts_only, n_coords_only = len(counts) - len(shared), len(coords) - len(shared)
    if n_counts_only or n_coords_only:
        logger.warning(
            "Section %r: dropped %d spots found only in %s and %d found only in %s; kept the %d spots in both.",
            sample, n_counts_only, files.counts.name, n_coords_only, files.coordinates.name, len(shared),
        )  # fmt: skip
    coords = coords.loc[shared]
    xy = coords[["pixel_x", "pixel_y"]].to_numpy(float)
    outside = (xy[:, 0] < 0) | (xy[:, 0] >= width) | (xy[:, 1] < 0) | (xy[:, 1] >= height)
    if outside.any():
        msg = (
            f"{int(outside.sum())} of {len(xy)} spot centres of {str(files.coordinates)!r} lie outside the image "
            f"{str(files.image)!r} ({width} x {height} px), e.g. {xy[outside][0].tolist()}. Do the pixel coordinates "
            "belong to this image at this resolution?"
        )
        raise ValueError(msg)

    measured = pixel_size is None
    if measured:
        pixel_size = fit_pixel_size(coords, array_pitch_um=array_pitch_um, file=files.coordinates)
    radius_px = spot_diameter_um / 2 / pixel_size

    counts = counts.loc[shared]
    adata = ad.AnnData(
        X=sp.csr_matrix(counts.to_numpy(dtype=np.float32)),
        obs=pd.DataFrame(
            {
                Key.SAMPLE: sample,
                Key.ARRAY_ROW: coords["y"].to_numpy(int),
                Key.ARRAY_COL: coords["x"].to_numpy(int),
            },
            index=pd.Index(shared, name=None),
        ),
        var=pd.DataFrame(index=counts.columns.astype(str)),
    )
    adata.obsm[Key.SPATIAL] = xy
    params = {
        "path": str(Path(path).resolve()),
        "image": files.image.name,
        "pixel_size": float(pixel_size),
        "pixel_size_measured": measured,
        "spot_diameter_um": float(spot_diameter_um),
        "array_pitch_um": float(array_pitch_um),
        "spot_radius_px": float(radius_px),
        "n_spots": int(len(shared)),
        "n_dropped_counts_only": int(n_counts_only),
        "n_dropped_coordinates_only": int(n_coords_only),
    }
    logger.info(
        "Read section %r: %d spots, %d genes, image %d x %d px, %.4f um/px (%s).",
        sample, adata.n_obs, adata.n_vars, width, height, pixel_size, "measured" if measured else "given",
    )  # fmt: skip
    img = pyramid_image_element(levels, sample, pixel_size)
    spots = spots_element(xy, radius_px, list(shared), sample, pixel_size)
    return img, spots, adata, params


def read_st(
    path: str | Path,
    sample: str,
    *,
    pixel_size: float | None = None,
    spot_diameter_um: float = 100.0,
    array_pitch_um: float = 200.0,
) -> SpatialData:
    """Read one legacy Spatial Transcriptomics section (the format of HER2ST).

    The folder ``path`` holds, for section ``S``:

    - ``S.tsv.gz``: raw counts, spots x genes, tab-separated, row names ``"{x}x{y}"`` (array coordinates);
    - ``S_selection.tsv``: one row per spot with array coordinates ``x``, ``y`` (and the adjusted
      ``new_x``, ``new_y``) and the spot centre in image pixels ``pixel_x``, ``pixel_y``;
    - ``S.jpg``: the full-resolution H&E image (``.jpeg``, ``.png`` and ``.tif`` are accepted too).

    The image is read lazily: opening reads its header only, and the first pixel access decodes
    the file once for all chunks and pyramid levels. Spots present in only one of the counts and the
    coordinates are dropped with a warning.

    Parameters
    ----------
    path
        Folder with the section's files.
    sample
        Section id ``S`` (the file prefix); names the elements and ``.obs["sample"]``.
    pixel_size
        Micrometres per pixel of the image. By default measured from the spots: a least-squares
        fit of the pixel centres on the array coordinates gives the pixels per array step, which is
        ``array_pitch_um`` micrometres.
    spot_diameter_um
        Physical spot diameter; the circles get radius ``spot_diameter_um / 2 / pixel_size`` pixels.
    array_pitch_um
        Centre-to-centre distance of neighbouring spots on the array.

    Returns
    -------
    A SpatialData with

    - image ``"{S}_image"``: multiscale ``(c, y, x)`` uint8 RGB, chunked, lazy;
    - shapes ``"{S}_spots"``: spot circles (centres and radius in pixels), index ``"{x}x{y}"``;
    - table ``"spots"``: raw counts (sparse CSR, float32) annotating ``"{S}_spots"``, with
      ``.obs["sample"]``, ``.obs["array_row"]``, ``.obs["array_col"]``, ``.obsm["spatial"]`` (pixel
      centres) and the reader's parameters in ``.uns["bitro"]["read_st"][S]``;
    - coordinate systems ``"{S}"`` (pixels) and ``"{S}_um"`` (micrometres).

    Examples
    --------
    >>> import bitro as bt
    >>> from bitro.datasets._her2st import BUNDLED_DIR
    >>> sdata = bt.io.read_st(BUNDLED_DIR, "B4")
    >>> sdata["spots"].n_obs
    283
    """
    from bitro.io._build import section_sdata, spots_table

    img, spots, adata, params = read_st_section(
        Path(path), sample, pixel_size=pixel_size, spot_diameter_um=spot_diameter_um, array_pitch_um=array_pitch_um
    )
    table = spots_table([adata])
    table.uns[Key.UNS] = {Key.READ_ST: {sample: params}}
    return section_sdata(sample, img, spots, table)
