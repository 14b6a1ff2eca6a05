"""Small helpers shared by the subpackages: key checks, pixel sizes, lazy imports."""

from __future__ import annotations

import ctypes
import functools
import importlib
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from bitro._constants import Key

if TYPE_CHECKING:
    import torch
    import xarray as xr
    from spatialdata import SpatialData


def check_key(container: Mapping[str, Any] | Iterable[str], key: str, what: str) -> None:
    """Raise a :class:`KeyError` naming ``key`` and listing the keys that do exist."""
    keys = list(container.keys()) if isinstance(container, Mapping) else list(container)
    if key not in keys:
        msg = f"{what} {key!r} not found. Available: {sorted(map(str, keys)) or 'none'}."
        raise KeyError(msg)


def get_table(data: Any, table_key: str, what: str = "Table") -> Any:
    """The AnnData itself, or the table ``table_key`` of a SpatialData (the one table resolver of bitro)."""
    from anndata import AnnData

    if isinstance(data, AnnData):
        return data
    tables = getattr(data, "tables", None)
    if tables is None:
        msg = f"`data` must be an AnnData or a SpatialData, got {type(data).__name__}."
        raise TypeError(msg)
    if table_key not in tables:
        msg = f"{what} {table_key!r} not found in the SpatialData. Available tables: {sorted(tables) or 'none'}."
        raise KeyError(msg)
    return tables[table_key]


def resolve_device(device: str | None = None) -> torch.device:
    """``device``, else ``bitro.settings.device``; ``"auto"`` is CUDA when available, else the CPU."""
    import torch

    from bitro._settings import settings

    d = device or settings.device
    if d == "auto":
        d = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(d)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        return None


def release_memory() -> None:
    """Hand memory freed by large temporaries back to the operating system.

    glibc keeps freed blocks of up to 32 MB in its heaps, so after training or predicting a process holds
    hundreds of MB it no longer uses (0.46 GB after the demo's training); ``malloc_trim`` returns them. A no-op
    where the C library is not glibc.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def import_optional(module: str, extra: str | None = None) -> ModuleType:
    """Import ``module`` or raise an :class:`ImportError` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint = f"pip install 'bitro[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
        msg = f"This function needs the package {module!r}, which could not be imported ({e}). Install it with `{hint}`."
        raise ImportError(msg) from e


def scale0(image: xr.DataArray | xr.DataTree) -> xr.DataArray:
    """The full-resolution level of a single- or multiscale image element."""
    import xarray as xr

    if isinstance(image, xr.DataTree):
        return next(iter(image["scale0"].values()))
    return image


def pixel_size(sdata: SpatialData, image_key: str, coordinate_system: str | None = None) -> float:
    """Micrometres per pixel of an image's full-resolution level.

    Read from the ``Scale`` from the image to the micrometre coordinate system ``"{cs}_um"``
    that bitro's readers write (``cs`` defaults to the image's first pixel coordinate system).
    """
    from spatialdata.transformations import get_transformation

    check_key(sdata.images, image_key, "Image")
    transforms = get_transformation(sdata.images[image_key], get_all=True)
    if coordinate_system is None:
        pixel_cs = [cs for cs in transforms if not cs.endswith(Key.MICRONS_SUFFIX)]
        coordinate_system = pixel_cs[0] if pixel_cs else next(iter(transforms))
    um_cs = Key.microns(coordinate_system)
    if um_cs not in transforms:
        msg = (
            f"Image {image_key!r} has no micrometre coordinate system {um_cs!r}, so its pixel size is unknown. "
            f"Record it with `bitro.io.set_pixel_size(sdata, {image_key!r}, um_per_px)` "
            f"(coordinate systems present: {sorted(transforms)})."
        )
        raise ValueError(msg)
    to_um = transforms[um_cs].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    to_px = transforms[coordinate_system].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    # um per pixel of the pixel coordinate system = scale(image->um) / scale(image->pixel cs)
    return float(np.sqrt(abs(np.linalg.det(to_um[:2, :2]))) / np.sqrt(abs(np.linalg.det(to_px[:2, :2]))))


def image_offset(image: Any, coordinate_system: str | None = None) -> tuple[float, float]:
    """Where an image's pixel ``(0, 0)`` lies in its pixel coordinate system, ``(dx, dy)``.

    Non-zero for a translated crop (e.g. from :func:`spatialdata.bounding_box_query`); ``(0, 0)`` for any
    transformation other than a translation. ``coordinate_system`` defaults to the image's first pixel one.
    """
    from spatialdata.transformations import get_transformation

    transforms = get_transformation(image, get_all=True)
    if coordinate_system is None:
        pixel_cs = [cs for cs in transforms if not cs.endswith(Key.MICRONS_SUFFIX)]
        coordinate_system = pixel_cs[0] if pixel_cs else None
    if coordinate_system not in transforms:
        return 0.0, 0.0
    m = transforms[coordinate_system].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    if not np.allclose(m[:2, :2], np.eye(2)):
        return 0.0, 0.0
    return float(m[0, 2]), float(m[1, 2])
