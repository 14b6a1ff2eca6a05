from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import bitro as bt
from bitro._constants import Key


@pytest.fixture(scope="module")
def synthetic_cells():
    """Cells of the synthetic dataset (true nuclei as shapes) with handcrafted features."""
    bt.settings.progress = False  # module fixture: set up before the per-test autouse fixture
    sdata = bt.datasets.synthetic(2, size=640, n_cell_types=4, seed=0)
    samples = [k[: -len(Key.IMAGE_SUFFIX)] for k in sdata.images]
    cells = bt.pp.extract_cells(sdata, shapes_key={s: Key.true_nuclei(s) for s in samples}, n_components=32)
    truth = sdata.tables[Key.TRUTH_TABLE].obs
    cell_type = pd.Series(
        truth[Key.CELL_TYPE].to_numpy(), index=truth[Key.SAMPLE].astype(str) + "_" + truth[Key.CELL_ID].astype(str)
    )
    return cells, cell_type.loc[cells.obs_names].to_numpy()


def test_phenotypes_recover_true_cell_types(synthetic_cells):
    from sklearn.metrics import adjusted_rand_score

    cells, cell_type = synthetic_cells
    cells = cells.copy()
    bt.pp.phenotypes(cells, n_clusters=4)
    ari = adjusted_rand_score(cell_type, cells.obs[Key.PHENOTYPE])
    print(f"ARI phenotypes vs true cell types: {ari:.3f}")
    assert ari >= 0.6
    assert cells.obs[Key.PHENOTYPE].dtype == "category"
    assert list(cells.obs[Key.PHENOTYPE].cat.categories) == ["0", "1", "2", "3"]
    assert cells.uns[Key.UNS][Key.PHENOTYPES]["centroids"].shape == (4, cells.obsm[Key.FEATURES].shape[1])


def test_phenotypes_reference_assigns_to_stored_centroids(synthetic_cells):
    cells, _ = synthetic_cells
    train = cells[cells.obs[Key.SAMPLE] == cells.obs[Key.SAMPLE].iloc[0]].copy()
    new = cells[cells.obs[Key.SAMPLE] != cells.obs[Key.SAMPLE].iloc[0]].copy()
    bt.pp.phenotypes(train, n_clusters=4)
    bt.pp.phenotypes(new, reference=train)
    centroids = train.uns[Key.UNS][Key.PHENOTYPES]["centroids"]
    d = np.linalg.norm(new.obsm[Key.FEATURES][:, None] - centroids[None], axis=2)
    np.testing.assert_array_equal(new.obs[Key.PHENOTYPE].cat.codes.to_numpy(), d.argmin(axis=1))
    assert new.uns[Key.UNS][Key.PHENOTYPES]["fitted_on"] == "reference"
    # the training cells themselves keep their labels
    again = train.copy()
    bt.pp.phenotypes(again, reference=train)
    assert (again.obs[Key.PHENOTYPE] == train.obs[Key.PHENOTYPE]).all()


def test_phenotypes_bad_input(synthetic_cells):
    cells, _ = synthetic_cells
    cells = cells.copy()
    with pytest.raises(ValueError, match="n_clusters"):
        bt.pp.phenotypes(cells, n_clusters=0)
    with pytest.raises(KeyError, match="'X_nope' not found"):
        bt.pp.phenotypes(cells, use_rep="X_nope")
    with pytest.raises(ValueError, match="has no"):
        bt.pp.phenotypes(cells, reference=ad.AnnData())
    with pytest.raises(ValueError, match="features"):
        bt.pp.phenotypes(cells, reference=np.zeros((3, 5)))
    other = cells.copy()
    bt.pp.phenotypes(other, n_clusters=3)
    other.uns[Key.UNS]["extract_cells"]["reducer"] = {
        **other.uns[Key.UNS]["extract_cells"]["reducer"],
        "pca_components": other.uns[Key.UNS]["extract_cells"]["reducer"]["pca_components"] + 1,
    }
    with pytest.raises(ValueError, match="different PCA"):
        bt.pp.phenotypes(cells, reference=other)
    assert Key.PHENOTYPE not in cells.obs


def _two_samples(n: int = 60, seed: int = 0) -> ad.AnnData:
    """Two samples with the same coordinates: any cross-sample edge would have distance 0."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 500, (n, 2))
    obs = pd.DataFrame({Key.SAMPLE: pd.Categorical(["a"] * n + ["b"] * n)}, index=[f"c{i}" for i in range(2 * n)])
    cells = ad.AnnData(obs=obs)
    cells.obsm[Key.SPATIAL] = np.concatenate([xy, xy])
    return cells


def test_spatial_graph_stays_within_samples():
    cells = _two_samples()
    bt.pp.spatial_graph(cells, n_neighs=8)
    conn = cells.obsp[Key.CONNECTIVITIES].tocoo()
    sample = cells.obs[Key.SAMPLE].to_numpy()
    assert conn.nnz > 0
    assert (sample[conn.row] == sample[conn.col]).all()
    assert (np.diff(cells.obsp[Key.CONNECTIVITIES].indptr) >= 8).all()
    assert cells.uns["spatial_neighbors"]["connectivities_key"] == Key.CONNECTIVITIES
    assert Key.DISTANCES in cells.obsp
    assert cells.uns[Key.UNS][Key.SPATIAL_GRAPH]["n_neighs"] == 8
    # the neighbours are the true nearest ones of the same sample
    xy = cells.obsm[Key.SPATIAL][:60]
    d = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    np.fill_diagonal(d, np.inf)
    row0 = set(cells.obsp[Key.CONNECTIVITIES][0].indices)
    assert set(np.argsort(d[0])[:8]) <= row0


def test_spatial_graph_bad_input():
    cells = _two_samples(n=5)
    with pytest.raises(ValueError, match=r"no more than n_neighs=8 cells"):
        bt.pp.spatial_graph(cells, n_neighs=8)
    with pytest.raises(KeyError, match="'slide' not found"):
        bt.pp.spatial_graph(cells, library_key="slide")
    with pytest.raises(ValueError, match="n_neighs"):
        bt.pp.spatial_graph(cells, n_neighs=0)
    assert Key.CONNECTIVITIES not in cells.obsp


def test_records_are_keyed_by_key_added():
    """A second graph or clustering under another `key_added` keeps its own record beside the first."""
    cells = _two_samples(n=40)
    cells.obsm[Key.FEATURES] = cells.obsm[Key.SPATIAL].astype(np.float32)
    bt.pp.spatial_graph(cells, n_neighs=8)
    bt.pp.spatial_graph(cells, n_neighs=4, key_added="near")
    records = cells.uns[Key.UNS]
    assert records[Key.SPATIAL_GRAPH]["n_neighs"] == 8  # the default stays where it always was
    assert records[Key.keyed(Key.SPATIAL_GRAPH, "near", Key.GRAPH)]["n_neighs"] == 4
    bt.pp.phenotypes(cells, n_clusters=3)
    bt.pp.phenotypes(cells, n_clusters=2, key_added="coarse")
    assert records[Key.PHENOTYPES]["centroids"].shape[0] == 3
    coarse = records[Key.keyed(Key.PHENOTYPES, "coarse", Key.PHENOTYPE)]
    assert coarse["centroids"].shape[0] == 2 and coarse["key_added"] == "coarse"
    # a reference is read under the same key_added
    new = cells.copy()
    bt.pp.phenotypes(new, reference=cells, key_added="coarse")
    assert (new.obs["coarse"] == cells.obs["coarse"]).all()
