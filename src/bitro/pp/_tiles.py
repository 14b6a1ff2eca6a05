"""Tile geometry and lazy tile reads over a section's full-resolution image.

A :class:`Tile` is a read window (the core plus ``overlap`` pixels on each side, clipped to the
image) and the core it owns. Per-tile work reads only its window (:func:`read_tile`) and keeps
only the objects whose centroid lies in the core (:meth:`Tile.owns`), so objects on seams are
found once and whole, as long as the overlap is at least twice the largest object's diameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import xarray as xr


@dataclass(frozen=True)
class Tile:
    """A window of an image and the core it owns, in full-resolution pixels (half-open ranges).

    Attributes
    ----------
    index
        Position of the tile in row-major grid order.
    y0, y1, x0, x1
        The window to read: the core grown by the overlap, clipped to the image.
    core_y0, core_y1, core_x0, core_x1
        The core: the cells of the grid partition the image, so every pixel has one owner.
    """

    index: int
    y0: int
    y1: int
    x0: int
    x1: int
    core_y0: int
    core_y1: int
    core_x0: int
    core_x1: int

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of the window."""
        return self.y1 - self.y0, self.x1 - self.x0

    def owns(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Whether image-space points ``(y, x)`` (full-resolution pixels) lie in the core."""
        y, x = np.asarray(y), np.asarray(x)
        return (y >= self.core_y0) & (y < self.core_y1) & (x >= self.core_x0) & (x < self.core_x1)


def tile_grid(height: int, width: int, *, tile_size: int, overlap: int) -> list[Tile]:
    """Cover an image with square cores of ``tile_size`` pixels, each read with ``overlap`` pixels around it.

    Parameters
    ----------
    height, width
        Size of the image in pixels.
    tile_size
        Edge of a core (the last row and column of cores are smaller when the size does not divide).
    overlap
        Extra pixels read on every side of a core.

    Returns
    -------
    The tiles in row-major order.
    """
    if tile_size < 1 or overlap < 0:
        msg = f"`tile_size` must be >= 1 and `overlap` >= 0, got tile_size={tile_size}, overlap={overlap}."
        raise ValueError(msg)
    tiles = []
    for cy0 in range(0, height, tile_size):
        for cx0 in range(0, width, tile_size):
            cy1, cx1 = min(cy0 + tile_size, height), min(cx0 + tile_size, width)
            tiles.append(
                Tile(
                    index=len(tiles),
                    y0=max(cy0 - overlap, 0),
                    y1=min(cy1 + overlap, height),
                    x0=max(cx0 - overlap, 0),
                    x1=min(cx1 + overlap, width),
                    core_y0=cy0,
                    core_y1=cy1,
                    core_x0=cx0,
                    core_x1=cx1,
                )
            )
    return tiles


def read_window(image: xr.DataArray, y: slice, x: slice) -> np.ndarray:
    """Read ``image.isel(y=y, x=x)`` of a ``(c, y, x)`` image as a ``(y, x, c)`` numpy array.

    Only the chunks that intersect the window are computed, by dask's local threads even while a
    distributed client is active (tiles are read here and then shipped to the workers).
    """
    window = image.isel(y=y, x=x).transpose("y", "x", "c")
    return np.ascontiguousarray(window.compute(scheduler="threads").values)


def read_tile(image: xr.DataArray, tile: Tile) -> np.ndarray:
    """Read the window of ``tile`` from a ``(c, y, x)`` image level as a ``(y, x, c)`` numpy array."""
    return read_window(image, slice(tile.y0, tile.y1), slice(tile.x0, tile.x1))


class TileReads(Sequence):
    """The tiles of an image, each read lazily with :func:`read_tile` when indexed.

    A sequence of ``(tile, array)`` pairs for :func:`bitro._parallel.map_tasks`: a serial run reads
    one window at a time; process and dask runs read each window in this process and ship it.
    """

    def __init__(self, image: xr.DataArray, tiles: Sequence[Tile]):
        self.image = image
        self.tiles = list(tiles)

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        tile = self.tiles[i]
        return tile, read_tile(self.image, tile)
