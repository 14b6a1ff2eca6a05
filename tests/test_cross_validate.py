from __future__ import annotations

import numpy as np
import pytest

import bitro as bt
from bitro._constants import Key

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SAMPLES = ("synth0", "synth1", "synth2")


@pytest.fixture(scope="module")
def synthetic_cells():
    sdata = bt.datasets.synthetic(3, size=768, seed=1)
    cells = bt.pp.extract_cells(sdata, shapes_key={s: Key.true_nuclei(s) for s in SAMPLES})
    bt.pp.phenotypes(cells, n_clusters=4)
    bt.pp.spatial_graph(cells)
    return sdata


def test_color_statistics_match_the_patch(synthetic_cells):
    sdata = synthetic_cells
    stats = bt.tl.color_statistics(sdata)
    spots = sdata[Key.SPOTS_TABLE]
    assert stats.shape == (spots.n_obs, 45)
    assert np.array_equal(spots.obsm[Key.COLOR_STATS], stats)
    # mean red of the first spot by hand
    from bitro._utils import scale0

    sample, spot = spots.obs[Key.SAMPLE].iloc[0], spots.obs[Key.SPOT_ID].iloc[0]
    circle = sdata.shapes[Key.spots(sample)].loc[spot]
    x, y, r = circle.geometry.x, circle.geometry.y, circle["radius"]
    img = scale0(sdata.images[Key.image(sample)]).transpose("y", "x", "c").values
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    inside = (xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 <= r**2
    assert stats[0, 0] == pytest.approx(img[inside][:, 0].mean() / 255, rel=1e-6)


def test_cross_validate_scores_model_and_baselines(synthetic_cells):
    sdata = synthetic_cells
    scores = bt.tl.cross_validate(sdata, folds=["synth2"], validation=None, epochs=20, dim=32, lr=3e-3)
    assert set(scores["method"]) == {"bitro", "mean", "ridge"}
    fold = scores[scores["held_out"] == "synth2"].set_index("method")
    assert fold.loc["mean", "pcc_gene"] != fold.loc["mean", "pcc_gene"] or abs(fold.loc["mean", "pcc_gene"]) < 1e-6
    # expression is driven by the cell types: the model must beat both baselines on PCC_gene
    assert fold.loc["bitro", "pcc_gene"] > max(fold.loc["ridge", "pcc_gene"], 0.2)
    assert (scores["held_out"] == "mean").sum() == 3
    # the user's tables are untouched
    assert Key.PREDICTED not in sdata[Key.SPOTS_TABLE].layers


def test_cross_validate_bad_input(synthetic_cells):
    sdata = synthetic_cells
    with pytest.raises(KeyError, match="not a column"):
        bt.tl.cross_validate(sdata, library_key="patient")
    with pytest.raises(KeyError, match="not `sample` groups"):
        bt.tl.cross_validate(sdata, folds=["nope"])
    with pytest.raises(ValueError, match="cells="):
        bt.tl.cross_validate(sdata[Key.SPOTS_TABLE])
    with pytest.raises(ValueError, match="scale"):
        bt.tl.cross_validate(sdata, scale="tpm")
