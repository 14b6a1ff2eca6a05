"""Write a SpatialData to zarr so that a crash never leaves a half-written or half-deleted store."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from bitro._deprecate import renamed_args
from bitro._logging import logger
from bitro._utils import release_memory

if TYPE_CHECKING:
    from spatialdata import SpatialData

#: Files that mark a folder as a zarr store (zarr v3, v2).
_ZARR_MARKERS = ("zarr.json", ".zgroup", ".zattrs")


@contextmanager
def _unsharded_tables() -> Iterator[None]:
    """Write the tables' zarr v3 arrays unsharded, as anndata does by default, without its warning per array.

    While ``anndata.settings.auto_shard_zarr_v3`` is unset (``None``), anndata writes every array of a table
    unsharded and warns "zarr v3 autosharding will be the default in the next minor release." once per array
    (dozens per table). Setting it to ``False`` for the write keeps exactly that layout and says so; a value the
    user chose (``True`` or ``False``) is left as it is.
    """
    import anndata as ad

    if getattr(ad.settings, "auto_shard_zarr_v3", False) is not None:  # chosen by the user, or an older anndata
        yield
        return
    with ad.settings.override(auto_shard_zarr_v3=False):
        yield


@renamed_args(sdata="data")
def write_zarr(data: SpatialData, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``data`` to a zarr store, atomically.

    The store is written to a temporary sibling of ``path`` and renamed into place only when
    complete, so a crash or an error while writing leaves any existing store at ``path`` untouched.
    Because the old store is replaced only after the new one is complete, a SpatialData that was
    read lazily from ``path`` can be written back to ``path``.

    Parameters
    ----------
    data
        The SpatialData to write.
    path
        Destination (conventionally ending in ``.zarr``).
    overwrite
        Replace an existing store at ``path``. Only zarr stores are ever replaced; another file or
        folder at ``path`` is an error.

    Returns
    -------
    The path written. ``data`` is backed by it afterwards (``data.path``), as after
    :meth:`spatialdata.SpatialData.write`.

    Examples
    --------
    >>> import bitro as bt
    >>> sdata = bt.datasets.her2st(["B4"])
    >>> bt.io.write_zarr(sdata, "her2st_B4.zarr")  # doctest: +SKIP
    """
    from spatialdata import SpatialData

    from bitro._atomic import recover, sibling, swap_in

    if not isinstance(data, SpatialData):
        msg = (
            f"`data` must be a SpatialData, got {type(data).__name__}; write an AnnData with `adata.write_h5ad(path)` "
            "or put it into a SpatialData first."
        )
        raise TypeError(msg)
    path = Path(path).absolute()
    recover(path)  # what a killed write left: a store moved aside comes back, dead writers' temporary copies go
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
    tmp = sibling(path, "tmp")
    release_memory()  # what earlier steps freed, before the write decodes images and encodes chunks
    try:
        with _unsharded_tables():
            data.write(tmp, overwrite=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, path)  # the old store is moved aside, the new one renamed in, and only then the old one removed
    release_memory()  # the decoded images and encoded chunks of the write
    data.path = path
    logger.info("Wrote %s.", path)
    return path
