"""Reader for pyramidal whole-slide images (tiled TIFF, OME-TIFF, Aperio SVS), read lazily with tifffile."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bitro._logging import logger

if TYPE_CHECKING:
    import tifffile
    from spatialdata import SpatialData

#: Micrometres per unit of the TIFF ResolutionUnit tag (2: inch, 3: centimetre).
_UM_PER_RESOLUTION_UNIT = {2: 25400.0, 3: 10000.0}
#: Micrometres per unit of OME PhysicalSizeXUnit.
_UM_PER_OME_UNIT = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
#: "|MPP = 0.2520|" in an Aperio SVS image description.
_SVS_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.]+(?:[eE][-+]?[0-9]+)?)")


def _mpp_svs(tif: tifffile.TiffFile) -> float | None:
    description = tif.pages.first.description or ""
    match = _SVS_MPP.search(description) if description.startswith("Aperio") else None
    return float(match.group(1)) if match else None


def _mpp_ome(tif: tifffile.TiffFile) -> float | None:
    if not tif.is_ome or not tif.ome_metadata:
        return None
    for element in ET.fromstring(tif.ome_metadata).iter():
        if element.tag.endswith("Pixels") and "PhysicalSizeX" in element.attrib:
            unit = element.attrib.get("PhysicalSizeXUnit", "µm")
            if unit in _UM_PER_OME_UNIT:
                return float(element.attrib["PhysicalSizeX"]) * _UM_PER_OME_UNIT[unit]
    return None


def _mpp_resolution_tags(tif: tifffile.TiffFile) -> float | None:
    page = tif.pages.first
    unit = int(page.resolutionunit)
    if unit not in _UM_PER_RESOLUTION_UNIT or "XResolution" not in page.tags:
        return None
    px_per_unit = page.get_resolution()[0]
    if not px_per_unit or px_per_unit <= 1:  # 1 px per unit (or 72 dpi written by default) means "unknown"
        return None
    if unit == 2 and px_per_unit in (72, 96, 300):  # screen/print defaults, not a microscope's resolution
        return None
    return _UM_PER_RESOLUTION_UNIT[unit] / px_per_unit


def slide_pixel_size(tif: tifffile.TiffFile) -> tuple[float | None, str]:
    """Micrometres per pixel of a slide's full resolution from its metadata, and where it was found."""
    readers = (("SVS MPP", _mpp_svs), ("OME PhysicalSizeX", _mpp_ome), ("TIFF resolution tags", _mpp_resolution_tags))
    for source, read in readers:
        mpp = read(tif)
        if mpp is not None and np.isfinite(mpp) and mpp > 0:
            return mpp, source
    return None, ""


def _sample_name(path: Path) -> str:
    name = path.name.split(".")[0]
    return re.sub(r"[^0-9A-Za-z_-]", "_", name) or "slide"


def read_wsi(path: str | Path, *, sample: str | None = None, pixel_size: float | None = None) -> SpatialData:
    """Read a pyramidal whole-slide image (tiled TIFF, OME-TIFF, Aperio SVS) lazily.

    Nothing is decoded on opening: every level stored in the file becomes a level of a multiscale
    image, and a crop decodes only the tiles it touches.

    Parameters
    ----------
    path
        The slide file.
    sample
        Section id; names the image ``"{sample}_image"`` and the coordinate systems. Defaults to the
        file name without its extensions.
    pixel_size
        Micrometres per pixel of the full resolution. By default read from the file: the ``MPP`` of an
        SVS description, the OME ``PhysicalSizeX``, or the TIFF resolution tags. Giving it overrides
        the file's value.

    Returns
    -------
    A SpatialData with the image ``"{sample}_image"`` (multiscale ``(c, y, x)`` uint8 RGB, one level per
    stored level) in the coordinate systems ``"{sample}"`` (pixels) and ``"{sample}_um"`` (micrometres).

    Examples
    --------
    >>> import bitro as bt
    >>> sdata = bt.io.read_wsi("slide.svs")  # doctest: +SKIP
    >>> sdata["slide_image"]["scale0"]["image"].shape  # doctest: +SKIP
    (3, 40000, 60000)
    """
    import dask.array as da
    import tifffile
    import zarr

    from bitro.io._build import IMAGE_CHUNK, pyramid_image_element, section_sdata

    path = Path(path)
    if not path.is_file():
        msg = f"The slide {str(path)!r} does not exist or is not a file."
        raise FileNotFoundError(msg)
    if pixel_size is not None and (not np.isfinite(pixel_size) or pixel_size <= 0):
        msg = f"`pixel_size` must be a positive number of micrometres per pixel, got {pixel_size!r}."
        raise ValueError(msg)
    try:
        tif = tifffile.TiffFile(path)
    except (tifffile.TiffFileError, OSError, ValueError) as e:
        msg = f"Cannot read {str(path)!r} as a TIFF/SVS slide: {e}."
        raise ValueError(msg) from e
    with tif:
        series = tif.series[0]
        shapes = [tuple(level.shape) for level in series.levels]
        axes = series.axes
        file_mpp, source = slide_pixel_size(tif)
    if axes != "YXS" or shapes[0][2] not in (3, 4) or series.dtype != np.uint8:
        msg = (
            f"The slide {str(path)!r} holds {series.dtype} pixels with axes {axes!r} and shape {shapes[0]}; "
            "bitro needs an 8-bit RGB slide (axes 'YXS' with 3 samples). Convert it to RGB first."
        )
        raise ValueError(msg)
    if pixel_size is None:
        if file_mpp is None:
            msg = (
                f"The slide {str(path)!r} records no pixel size (no SVS MPP, OME PhysicalSizeX or TIFF resolution "
                "tags). Pass `pixel_size=` (micrometres per pixel of the full resolution)."
            )
            raise ValueError(msg)
        pixel_size = file_mpp
    elif file_mpp is not None and not np.isclose(file_mpp, pixel_size, rtol=0.05):
        logger.warning(
            "%s: using the given pixel size %.4g um/px, not the file's %.4g (%s).", path.name, pixel_size, file_mpp, source
        )
    if shapes[0][2] == 4:
        logger.warning("The slide %r has an alpha channel; it is dropped (only RGB is used).", str(path))
    sample = _sample_name(path) if sample is None else sample

    store = tifffile.imread(path, aszarr=True)
    group = zarr.open(store, mode="r")
    arrays = [group[str(i)] for i in range(len(shapes))] if isinstance(group, zarr.Group) else [group]
    levels = []
    for array in arrays:
        level = da.from_zarr(array)[..., :3].transpose(2, 0, 1)
        levels.append(level.rechunk((3, IMAGE_CHUNK, IMAGE_CHUNK)))
    logger.info(
        "Read slide %r: %d levels, %d x %d px, %.4g um/px (%s).",
        path.name, len(levels), shapes[0][1], shapes[0][0], pixel_size, source if file_mpp == pixel_size else "given",
    )  # fmt: skip
    return section_sdata(sample, pyramid_image_element(levels, sample, pixel_size))
