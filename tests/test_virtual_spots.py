from __future__ import annotations

import numpy as np
import pytest

import bitro as bt
from bitro.pp._lattice import covering_lattice


@pytest.mark.parametrize("radius", [5.0, 27.5, 50.0])
def test_covering_lattice_covers_every_point(radius):
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(0)
    xy = np.concatenate([rng.uniform(0, 1000, (3000, 2)), rng.normal(1500, 30, (200, 2))])  # tissue and an island
    centres = covering_lattice(xy, radius)
    dist, _ = cKDTree(centres).query(xy)
    assert dist.max() <= radius * (1 + 1e-9)  # every point lies inside a circle
    assert (cKDTree(xy).query(centres)[0] <= radius * (1 + 1e-9)).all()  # no empty circle is kept
    # no denser than needed: one circle per hexagon of the covering lattice (area 1.5 * sqrt(3) * r^2), plus the edge
    hexagon = 1.5 * np.sqrt(3) * radius**2
    assert len(centres) <= (1000 + 4 * radius) ** 2 / hexagon + (np.pi * (90 + 2 * radius) ** 2) / hexagon + 10


def test_virtual_spots_of_a_spatialdata(toy_tl):
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    _, cells = toy_tl
    shapes = {}
    sdata = SpatialData(tables={"cells": cells}, shapes=shapes)
    table = bt.pp.virtual_spots(sdata, diameter_um=50, key_added="virtual")
    TableModel().validate(sdata.tables["virtual"])
    assert set(table.obs["sample"]) == {"S0", "S1", "S2"} and (table.obs["n_cells"] >= 1).all()
    circles = sdata.shapes["S0_virtual_spots"]
    np.testing.assert_allclose(circles["radius"], 25 / 0.5)  # 25 um at 0.5 um/px
    assert list(circles.index) == list(table.obs.loc[table.obs["sample"] == "S0", "spot_id"])
    # every cell lies in at least one spot, and n_cells counts them
    total = table.obs["n_cells"].sum()
    assert total >= cells.n_obs


@pytest.mark.parametrize("diameter", [0, -5, float("nan"), "55"])
def test_virtual_spots_bad_diameter(toy_tl, diameter):
    _, cells = toy_tl
    with pytest.raises(ValueError, match="diameter_um"):
        bt.pp.virtual_spots(cells, diameter_um=diameter)


def test_virtual_spots_needs_pixel_sizes(toy_tl):
    _, cells = toy_tl
    del cells.uns["bitro"]["pixel_size"]
    with pytest.raises(KeyError, match="pixel size"):
        bt.pp.virtual_spots(cells, diameter_um=55)
