"""The target scales: cp10k (library over all genes), log1p, hist2st (library over the predicted genes only)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import bitro as bt
from bitro._constants import Key
from bitro.tl._evaluate import observed_on_scale
from bitro.tl._targets import SCALES, check_scale, to_scale, training_targets

#: 2 spots x 4 genes; the predicted genes are the first two.
COUNTS = np.array([[1.0, 3.0, 6.0, 0.0], [2.0, 2.0, 0.0, 0.0]])
BAD_SCALE = r"scale='tpm' is not supported; use one of \('cp10k', 'log1p', 'hist2st'\)\."


def test_three_scales_by_hand():
    assert SCALES == ("cp10k", "log1p", "hist2st")
    cols = [0, 1]
    # cp10k: the library over all 4 genes (10 and 4)
    expected_cp10k = np.log1p([[1e4 * 1 / 10, 1e4 * 3 / 10], [1e4 * 2 / 4, 1e4 * 2 / 4]])
    np.testing.assert_allclose(to_scale(COUNTS, "cp10k", cols), expected_cp10k)
    np.testing.assert_allclose(to_scale(COUNTS, "cp10k")[:, cols], expected_cp10k)
    # log1p: no library
    np.testing.assert_allclose(to_scale(COUNTS, "log1p", cols), np.log1p([[1.0, 3.0], [2.0, 2.0]]))
    # hist2st: the library over the predicted genes only (4 and 4)
    expected_hist2st = np.log1p([[1e4 * 1 / 4, 1e4 * 3 / 4], [1e4 * 2 / 4, 1e4 * 2 / 4]])
    np.testing.assert_allclose(to_scale(COUNTS, "hist2st", cols), expected_hist2st)
    # without cols every column is a predicted gene: hist2st is then cp10k
    np.testing.assert_allclose(to_scale(COUNTS, "hist2st"), to_scale(COUNTS, "cp10k"))
    # one gene shown, the library still over the predicted genes
    np.testing.assert_allclose(to_scale(COUNTS, "hist2st", [1], library=cols), expected_hist2st[:, [1]])
    # a spot whose predicted genes are all 0 is 0, not NaN
    assert (to_scale(np.array([[0.0, 0.0, 5.0]]), "hist2st", [0, 1]) == 0).all()


def test_observed_on_scale_uses_the_predicted_genes():
    adata = ad.AnnData(sp.csr_matrix(COUNTS), var=pd.DataFrame(index=["A", "B", "C", "D"]))
    rows = np.arange(2)
    np.testing.assert_allclose(
        observed_on_scale(adata, rows, np.array([0, 1]), "hist2st"), to_scale(COUNTS, "hist2st", [0, 1])
    )
    np.testing.assert_allclose(
        observed_on_scale(adata, rows, np.array([1]), "hist2st", library=np.array([0, 1])),
        to_scale(COUNTS, "hist2st", [0, 1])[:, [1]],
    )


def test_evaluate_hist2st_scores_against_the_predicted_genes_library():
    rng = np.random.default_rng(0)
    counts = rng.poisson(20, (30, 5)).astype(float)
    adata = ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=list("ABCDE")))
    adata.obs[Key.SAMPLE] = "s"
    truth = to_scale(counts, "hist2st", [0, 1, 2])
    adata.obsm["pred"] = pd.DataFrame(truth, index=adata.obs_names, columns=list("ABC"))
    scores = bt.tl.evaluate(adata, layer="pred", scale="hist2st", key_added="h")
    assert scores.loc[0, "pcc_gene"] == pytest.approx(1.0) and scores.loc[0, "pcc_overall"] == pytest.approx(1.0)
    assert adata.uns["h"]["scale"] == "hist2st"
    # the same predictions scored on cp10k (library over all 5 genes) do not match exactly
    off = bt.tl.evaluate(adata, layer="pred", scale="cp10k", key_added="c")
    assert off.loc[0, "pcc_gene"] < 0.99


def test_training_targets_hist2st():
    rng = np.random.default_rng(1)
    counts = rng.poisson(5, (12, 6)).astype(float)
    counts[:, 5] = rng.poisson(50, 12)  # a highly expressed gene that is not predicted
    names = [f"G{i}" for i in range(6)]
    samples = np.repeat(["a", "b"], 6)
    chosen, zscore, yz = training_targets(
        counts, names, samples, scale="hist2st", genes=["G2", "G0"], n_top_genes=1, center=False
    )
    assert chosen == ["G2", "G0"]
    np.testing.assert_allclose(zscore.inverse(yz), to_scale(counts, "hist2st", [2, 0]), rtol=1e-5, atol=1e-5)
    # genes=None: ranked on cp10k (hist2st over all genes), then the targets over the chosen genes' library
    top, _, yz_top = training_targets(counts, names, samples, scale="hist2st", genes=None, n_top_genes=3, center=False)
    ranked, _, _ = training_targets(counts, names, samples, scale="cp10k", genes=None, n_top_genes=3, center=False)
    assert top == ranked
    _, zscore_top, _ = training_targets(counts, names, samples, scale="hist2st", genes=top, n_top_genes=1, center=False)
    np.testing.assert_allclose(
        zscore_top.mean, to_scale(counts, "hist2st", [names.index(g) for g in top]).mean(0), rtol=1e-6
    )


@pytest.mark.parametrize("scale", ["tpm", "CP10K", "", None])
def test_bad_scale_names(scale):
    with pytest.raises(ValueError, match=r"is not supported; use one of \('cp10k', 'log1p', 'hist2st'\)\.$"):
        check_scale(scale)


def test_bad_scale_everywhere(toy_tl):
    spots, cells = toy_tl
    with pytest.raises(ValueError, match=BAD_SCALE):
        bt.tl.fit(spots, cells=cells, scale="tpm")
    spots.obsm["pred"] = pd.DataFrame(np.ones((spots.n_obs, 1)), index=spots.obs_names, columns=["G0"])
    with pytest.raises(ValueError, match=BAD_SCALE):
        bt.tl.evaluate(spots, layer="pred", scale="tpm")
    train, test = spots[:20].copy(), spots[20:].copy()
    with pytest.raises(ValueError, match=BAD_SCALE):
        bt.tl.add_baselines(train, test, genes=["G0"], scale="tpm")
    train.obsm[Key.COLOR_STATS] = np.ones((train.n_obs, 3))
    test.obsm[Key.COLOR_STATS] = np.ones((test.n_obs, 3))
    with pytest.raises(ValueError, match=BAD_SCALE):
        bt.tl.reduced_rank_ridge(train, test, genes=["G0"], scale="tpm")
    assert "pred_eval" not in spots.uns and Key.BASELINE_MEAN not in test.obsm


@pytest.mark.usefixtures("torch_one_thread")
def test_fit_predict_evaluate_on_hist2st(toy_tl, tmp_path):
    pytest.importorskip("torch")
    spots, cells = toy_tl
    genes = ["G0", "G3", "G5", "G7"]
    tiny = {"dim": 16, "heads": 2, "ff_dim": 32, "max_context": 16, "context_radius": 60.0, "batch_size": 8}
    model = bt.tl.fit(
        spots, cells=cells, genes=genes, scale="hist2st", n_members=1, epochs=2, center_samples=False, **tiny
    )
    assert model.scale == "hist2st" and model.genes == genes
    # the targets' mean: counts per 10,000 of the 4 genes' library, not of all 12 genes
    counts = spots.X.toarray() if sp.issparse(spots.X) else np.asarray(spots.X)
    cols = spots.var_names.get_indexer(genes)
    np.testing.assert_allclose(model.zscore.mean, to_scale(counts, "hist2st", cols).mean(0), rtol=1e-5)
    assert not np.allclose(model.zscore.mean, to_scale(counts, "cp10k", cols).mean(0), rtol=1e-2)
    bt.tl.predict(model, spots, cells=cells, coverage="spots")
    scores = bt.tl.evaluate(spots)  # the scale recorded by predict
    assert spots.uns[Key.EVALUATION]["scale"] == "hist2st" and np.isfinite(scores["pcc_overall"]).all()
    model.save(tmp_path / "m")
    assert bt.tl.load_model(tmp_path / "m").scale == "hist2st"
