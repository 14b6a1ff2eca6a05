"""Renamed arguments keep their old names for one release: they work, warn with a FutureWarning, and clash with the new."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import bitro as bt
from bitro._constants import Key


def _cells(n: int = 60, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    cells = ad.AnnData(obs=pd.DataFrame({Key.SAMPLE: pd.Categorical(["a"] * n)}, index=[f"c{i}" for i in range(n)]))
    cells.obsm[Key.SPATIAL] = rng.uniform(0, 500, (n, 2))
    cells.obsm[Key.FEATURES] = rng.normal(size=(n, 4)).astype(np.float32)
    return cells


def test_old_keyword_names_work_and_warn():
    new, old = _cells(), _cells()
    bt.pp.phenotypes(new, n_clusters=3, seed=1)
    with pytest.warns(FutureWarning) as record:
        bt.pp.phenotypes(cells=old, n_clusters=3, random_state=1)
    said = [str(w.message) for w in record]
    assert any("`cells` is renamed `data`" in m for m in said) and any("`random_state` is renamed `seed`" in m for m in said)
    assert (old.obs[Key.PHENOTYPE] == new.obs[Key.PHENOTYPE]).all()
    with pytest.warns(FutureWarning, match=r"spatial_graph\(\): `cells` is renamed `data`"):
        bt.pp.spatial_graph(cells=old, n_neighs=4)
    assert old.obsp[Key.CONNECTIVITIES].shape == (old.n_obs, old.n_obs)


def test_positional_and_new_names_do_not_warn():
    cells = _cells()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        bt.pp.phenotypes(cells, n_clusters=3, seed=0)
        bt.pp.spatial_graph(data=cells, n_neighs=4)


def test_old_and_new_name_together_is_an_error():
    cells = _cells()
    with pytest.raises(TypeError, match=r"got both `cells` and `data`"):
        bt.pp.phenotypes(data=cells, cells=cells)
    with pytest.raises(TypeError, match=r"got both `random_state` and `seed`"):
        bt.pp.phenotypes(cells, n_clusters=3, seed=0, random_state=0)
    with pytest.raises(TypeError, match=r"got both `sdata` and `data`"):
        bt.io.get_sections(data=None, sdata=None)


def test_old_tl_names_work_and_warn(toy_tl):
    """bt.tl: `adata`, `n_seeds`, `feature_key`, `groupby`, `colour_statistics` and dict access to the config."""
    pytest.importorskip("torch")
    spots, cells = toy_tl
    tiny = {"dim": 16, "heads": 2, "ff_dim": 32, "max_context": 16, "context_radius": 60.0, "epochs": 1}
    with pytest.warns(FutureWarning) as record:
        model = bt.tl.fit(adata=spots, cells=cells, n_seeds=1, feature_key=Key.FEATURES, **tiny)
    said = " ".join(str(w.message) for w in record)
    for old, new in (("adata", "data"), ("n_seeds", "n_members"), ("feature_key", "use_rep")):
        assert f"`{old}` is renamed `{new}`" in said
    assert len(model.nets) == 1
    with pytest.warns(FutureWarning, match=r"model.config\.genes"):
        assert model.config["genes"] == model.genes
    bt.tl.predict(model, spots, cells=cells, coverage="spots")
    with pytest.warns(FutureWarning, match="`groupby` is renamed `library_key`"):
        table = bt.tl.evaluate(spots, groupby=None)
    assert list(table["group"]) == ["all"]
    with pytest.warns(FutureWarning, match="`colour_statistics` is renamed `color_statistics`"), pytest.raises(
        TypeError, match="`data` must be a SpatialData"
    ):
        bt.tl.colour_statistics("not data")


def test_old_pl_names_work_and_warn():
    cells = _cells()
    cells.obs["cluster"] = pd.Categorical(["x", "y"] * 30)
    with pytest.warns(FutureWarning, match="`key` is renamed `phenotype_key`"):
        ax = bt.pl.phenotypes(cells, key="cluster")
    assert ax.get_title().startswith("cluster")
