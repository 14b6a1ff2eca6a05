"""Read a flat H&E image (JPEG, PNG, ...) with no spatial data into a one-section SpatialData."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bitro._logging import logger

if TYPE_CHECKING:
    from spatialdata import SpatialData


def image_sample_name(path: str | Path) -> str:
    """The default section id of an image file: its name without extensions, with only ``[0-9A-Za-z_-]``."""
    name = Path(path).name.split(".")[0]
    return re.sub(r"[^0-9A-Za-z_-]", "_", name) or "slide"


def read_image(path: str | Path, *, pixel_size: float, sample: str | None = None) -> SpatialData:
    """Read a flat RGB H&E image (JPEG, PNG or any format PIL reads) lazily, as one section.

    JPEG and PNG files record no reliable physical pixel size, so bitro does not guess it: give it.
    Opening reads the header only; the image is decoded once, when a pixel is first needed (coarse
    pyramid levels of a JPEG come from cheap reduced decodes). For pyramidal TIFF / SVS slides use
    :func:`bitro.io.read_wsi`, which reads the pixel size from the file.

    Parameters
    ----------
    path
        The image file.
    pixel_size
        Micrometres per pixel of the image (e.g. about 0.5 at 20x, 0.25 at 40x).
    sample
        Section id; names the image ``"{sample}_image"`` and the coordinate systems. Defaults to the
        file name without its extensions.

    Returns
    -------
    A SpatialData with the image ``"{sample}_image"`` (multiscale ``(c, y, x)`` uint8 RGB, chunked, lazy)
    in the coordinate systems ``"{sample}"`` (pixels) and ``"{sample}_um"`` (micrometres).

    Examples
    --------
    >>> import bitro as bt
    >>> sdata = bt.io.read_image("my_slide.jpg", pixel_size=0.5)  # doctest: +SKIP
    >>> bt.pp.segment_nuclei(sdata)  # doctest: +SKIP
    """
    from bitro.io._build import IMAGE_CHUNK, pyramid_image_element, section_sdata
    from bitro.io._lazy_image import lazy_rgb_pyramid

    path = Path(path)
    if not path.is_file():
        msg = f"The image {str(path)!r} does not exist or is not a file."
        raise FileNotFoundError(msg)
    if pixel_size is None or isinstance(pixel_size, bool):
        msg = f"{path.name} records no pixel size bitro can trust: pass `pixel_size=` (micrometres per pixel)."
        raise ValueError(msg)
    try:
        pixel_size = float(pixel_size)
    except (TypeError, ValueError):
        pixel_size = float("nan")
    if not np.isfinite(pixel_size) or pixel_size <= 0:
        msg = f"`pixel_size` must be a positive number of micrometres per pixel, got {pixel_size!r}."
        raise ValueError(msg)
    sample = image_sample_name(path) if sample is None else str(sample)
    try:
        levels = lazy_rgb_pyramid(path, chunk=IMAGE_CHUNK)  # reads the header only
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError
        msg = f"Cannot read {str(path)!r} as an image: {e}."
        raise ValueError(msg) from e
    _, height, width = levels[0].shape
    logger.info("Read image %r: %d x %d px, %.4g um/px (given).", path.name, width, height, pixel_size)
    return section_sdata(sample, pyramid_image_element(levels, sample, pixel_size))
