"""Spot lattices: circle centres on a hexagonal (Visium-like) or square grid over a set of points."""

from __future__ import annotations

import math

import numpy as np

#: The lattice layouts :func:`lattice` lays.
LAYOUTS: tuple[str, ...] = ("hex", "grid")


def lattice(
    lo: np.ndarray, hi: np.ndarray, pitch: float, layout: str = "hex"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres of a lattice of ``pitch`` from ``lo`` over ``hi`` (``(x, y)``), row by row: ``(centres, rows, cols)``.

    The first centre is ``lo``; rows are ``pitch * sqrt(3) / 2`` apart with every other row shifted by half a
    ``pitch`` (``"hex"``, as Visium's spots), or ``pitch`` apart (``"grid"``); rows and columns run until they pass
    ``hi``. ``rows`` and ``cols`` are each centre's array row and column.
    """
    if layout not in LAYOUTS:
        msg = f"`layout` must be one of {LAYOUTS}, got {layout!r}."
        raise ValueError(msg)
    hexagonal = layout == "hex"
    row_step = pitch * math.sqrt(3) / 2 if hexagonal else pitch
    ys = np.arange(lo[1], hi[1] + row_step, row_step)
    xs = np.arange(lo[0], hi[0] + pitch, pitch)
    r, c = np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij")
    x = xs[c] + (r % 2) * pitch / 2 * hexagonal
    centres = np.stack([x.ravel(), ys[r].ravel()], axis=1)
    return centres, r.ravel(), c.ravel()


def covering_lattice(xy: np.ndarray, radius: float) -> np.ndarray:
    """Centres of circles of ``radius`` on a hexagonal lattice that together cover every point of ``xy``.

    The lattice spacing is ``radius * sqrt(3)``, the largest whose circles leave no gap, so every point lies
    within ``radius`` of a centre. Only centres with at least one point within ``radius`` are kept.

    Parameters
    ----------
    xy
        Points ``(n, 2)``.
    radius
        Circle radius, in the unit of ``xy``.

    Returns
    -------
    Centres ``(m, 2)``, row by row.
    """
    from scipy.spatial import cKDTree

    if len(xy) == 0:
        return np.zeros((0, 2))
    step = radius * math.sqrt(3)
    centres = lattice(xy.min(0) - step, xy.max(0) + step, step, "hex")[0]
    near = cKDTree(xy).query(centres, k=1, distance_upper_bound=radius * (1 + 1e-9))[0]
    return centres[np.isfinite(near)]


def spot_lattice(xy: np.ndarray, pitch: float, layout: str = "hex") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spot centres on a lattice of ``pitch`` over the bounding box of ``xy``: ``(centres, rows, cols)``.

    The first row starts half a pitch left of the leftmost point (see :func:`lattice`).
    """
    lo = xy.min(0)
    return lattice(np.array([lo[0] - pitch / 2, lo[1]]), xy.max(0), pitch, layout)
