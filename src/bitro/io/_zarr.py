"""Write a SpatialData to zarr so that a crash never leaves a half-written or half-deleted store."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from bitro._logging import logger

if TYPE_CHECKING:
    from spatialdata import SpatialData

#: Files that mark a folder as a zarr store (zarr v3, v2).
_ZARR_MARKERS = ("zarr.json", ".zgroup", ".zattrs")


def write_zarr(sdata: SpatialData, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``sdata`` to a zarr store, atomically.

    The store is written to a temporary sibling of ``path`` and renamed into place only when
    complete, so a crash or an error while writing leaves any existing store at ``path`` untouched.
    Because the old store is replaced only after the new one is complete, a SpatialData that was
    read lazily from ``path`` can be written back to ``path``.

    Parameters
    ----------
    sdata
        The SpatialData to write.
    path
        Destination (conventionally ending in ``.zarr``).
    overwrite
        Replace an existing store at ``path``. Only zarr stores are ever replaced; another file or
        folder at ``path`` is an error.

    Returns
    -------
    The path written. ``sdata`` is backed by it afterwards (``sdata.path``), as after
    :meth:`spatialdata.SpatialData.write`.

    Examples
    --------
    >>> import bitro as bt
    >>> sdata = bt.datasets.her2st(["B4"])
    >>> bt.io.write_zarr(sdata, "her2st_B4.zarr")  # doctest: +SKIP
    """
    path = Path(path).absolute()
    if path.exists() or path.is_symlink():
        if not overwrite:
            msg = f"{str(path)!r} already exists. Pass `overwrite=True` to replace it, or choose another path."
            raise FileExistsError(msg)
        if not path.is_dir() or not any((path / m).exists() for m in _ZARR_MARKERS):
            msg = (
                f"{str(path)!r} exists and is not a zarr store; refusing to replace it even with `overwrite=True`. "
                "Remove it yourself or choose another path."
            )
            raise FileExistsError(msg)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = path.with_name(f".{path.name}.tmp-{token}")
    old = path.with_name(f".{path.name}.old-{token}")
    try:
        sdata.write(tmp, overwrite=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        path.rename(old)  # keep the old store until the new one is in place
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    sdata.path = path
    logger.info("Wrote %s.", path)
    return path
