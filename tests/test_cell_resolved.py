"""Cell-resolved data (Xenium-like): pseudo-spots for training, predicted cells scored against the true cells."""

from __future__ import annotations

import numpy as np
import pytest

import bitro as bt

pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("torch_one_thread")
SAMPLES = ("synth0", "synth1", "synth2")


@pytest.fixture(scope="module")
def xenium():
    sdata = bt.datasets.synthetic(3, size=768, seed=1, layout="cells")
    assert "spots" not in sdata.tables and not any(k.endswith("_spots") for k in sdata.shapes)
    return sdata


def test_pseudo_spots_sum_the_cells_inside(xenium):
    from scipy.spatial import cKDTree
    from spatialdata.models import TableModel

    sdata = xenium
    spots = bt.pp.pseudo_spots(sdata, diameter_um=55, pitch_um=100)
    TableModel().validate(spots)
    counts = sdata["table"]
    for sample in SAMPLES:
        mine = spots[spots.obs["sample"] == sample]
        cells = counts[counts.obs["sample"] == sample]
        xy = cells.obsm["spatial"] * 0.5  # um
        centres = mine.obsm["spatial"] * 0.5
        assert len(sdata.shapes[f"{sample}_spots"]) == mine.n_obs
        np.testing.assert_allclose(sdata.shapes[f"{sample}_spots"]["radius"], 27.5 / 0.5)
        # a spot's counts are the sum over the cells whose centroid is within 27.5 um of its centre
        inside = cKDTree(xy).query_ball_point(centres, 27.5)
        expected = np.stack([np.asarray(cells.X[idx].sum(0)).ravel() for idx in inside])
        np.testing.assert_allclose(mine.X.toarray(), expected)
        assert (mine.obs["n_cells"].to_numpy() == [len(i) for i in inside]).all()
        # hexagonal lattice: nearest neighbours 100 um apart
        d = cKDTree(centres).query(centres, k=2)[0][:, 1]
        assert np.median(d) == pytest.approx(100, rel=1e-6)


def test_train_on_pseudo_spots_score_true_cells(xenium):
    sdata = xenium
    bt.pp.pseudo_spots(sdata, diameter_um=55, pitch_um=100)
    cells = bt.pp.extract_cells(sdata, shapes_key={s: f"{s}_true_nuclei" for s in SAMPLES})
    bt.pp.phenotypes(cells, n_clusters=4)
    bt.pp.spatial_graph(cells)
    spots = sdata["spots"]
    held = (spots.obs["sample"] == "synth2").to_numpy()
    model = bt.tl.fit(spots[~held].copy(), cells=cells, epochs=15, validation=None, readout="cell", n_members=1, dim=32)
    expr = bt.tl.predict(model, spots[held].copy(), cells=cells, coverage="spots")
    scores = bt.tl.evaluate_cells(expr, sdata["table"]).set_index("method")
    assert set(scores["sample"]) == {"synth2"}
    equal = scores.loc["equal split"]
    assert equal["within_spot"] == pytest.approx(0, abs=1e-9)  # by construction
    ours = scores.loc["bitro"]
    assert ours["within_spot"] > 0.05  # the model tells cells of one spot apart, in the right direction
    assert ours["pcc_gene"] > 0.1 and ours["n_cells_in_spots"] == expr.n_obs


def test_bad_input(xenium):
    sdata = xenium
    with pytest.raises(ValueError, match="smaller than a typical cell"):
        bt.pp.pseudo_spots(sdata, diameter_um=3, pitch_um=100)
    with pytest.raises(ValueError, match="pitch_um"):
        bt.pp.pseudo_spots(sdata, diameter_um=55, pitch_um=20)
    with pytest.raises(KeyError, match="No table 'nope'"):
        bt.pp.pseudo_spots(sdata, table_key="nope")
    no_shapes = sdata["table"].copy()
    no_shapes.uns.pop("spatialdata_attrs")
    sdata.tables["flat"] = no_shapes
    with pytest.raises(ValueError, match="does not annotate cell shapes"):
        bt.pp.pseudo_spots(sdata, table_key="flat")
    del sdata.tables["flat"]
    import anndata as ad

    pred = ad.AnnData(np.zeros((2, 1)), obs={"sample": ["a", "a"], "spot_id": ["x", "x"]})
    pred.obs_names = ["p0", "p1"]
    pred.var_names = ["GENE00"]
    with pytest.raises(KeyError, match="No cell of the predictions"):
        bt.tl.evaluate_cells(pred, sdata["table"], scale="cp10k")


def test_bad_input_of_the_issue(xenium):
    """Issue #14's bad inputs, each refused in one sentence before any work: cells and image in different coordinate
    systems, observed cells that share no gene with the predictions, an observed table without expression."""
    import anndata as ad
    from spatialdata.transformations import Identity, get_transformation, set_transformation

    sdata = xenium
    region = sdata["table"].uns["spatialdata_attrs"]["region"]
    region = region[0] if isinstance(region, list) else region
    before = get_transformation(sdata.shapes[region], get_all=True)
    spots_before = sdata.tables.get("spots")  # the fixture is shared: an earlier test may have made pseudo-spots
    set_transformation(sdata.shapes[region], {"elsewhere": Identity()}, set_all=True)
    with pytest.raises(ValueError, match="share no coordinate system with an H&E image"):
        bt.pp.pseudo_spots(sdata)
    set_transformation(sdata.shapes[region], before, set_all=True)
    assert sdata.tables.get("spots") is spots_before  # nothing was written

    pred = ad.AnnData(np.zeros((2, 1), dtype=np.float32), obs={"sample": ["a", "a"], "spot_id": ["x", "x"]})
    pred.obs_names = list(sdata["table"].obs_names[:2])
    pred.var_names = ["NOT_A_GENE"]
    with pytest.raises(KeyError, match="share no gene"):
        bt.tl.evaluate_cells(pred, sdata["table"], scale="cp10k")
    pred.var_names = [sdata["table"].var_names[0]]  # a gene the cells do have, but this table holds no expression
    no_expression = sdata["table"][:, :0].copy()
    with pytest.raises(KeyError, match="share no gene"):
        bt.tl.evaluate_cells(pred, no_expression, scale="cp10k")
