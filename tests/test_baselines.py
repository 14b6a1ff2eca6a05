from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import bitro as bt
from bitro._constants import Key

GENES = ["EPCAM", "ERBB2", "KRT19", "extra"]


def _table(n: int, seed: int, *, color: bool = True) -> ad.AnnData:
    """``n`` spots x 4 genes of Poisson counts; gene ``KRT19`` follows the first color statistic."""
    rng = np.random.default_rng(seed)
    stats = rng.normal(size=(n, 45))
    counts = rng.poisson(200, (n, len(GENES))).astype(float)
    counts[:, 2] = np.round(np.exp(2 + stats[:, 0]))
    obs = pd.DataFrame({Key.SAMPLE: f"s{seed}"}, index=[f"s{seed}_{i}" for i in range(n)])
    adata = ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=GENES))
    if color:
        adata.obsm[Key.COLOR_STATS] = stats
    return adata


@pytest.mark.parametrize("scale", ["cp10k", "log1p"])
def test_add_baselines_mean_and_ridge(scale):
    train, test = _table(60, 0), _table(20, 1)
    genes = ["KRT19", "EPCAM", "ERBB2"]
    bt.tl.add_baselines(train, test, genes=genes, scale=scale)

    def on_scale(counts):
        if scale == "cp10k":
            return np.log1p(1e4 * counts / counts.sum(axis=1, keepdims=True))  # library size over all genes
        return np.log1p(counts)

    expected = on_scale(train.X.toarray())
    cols = [GENES.index(g) for g in genes]
    mean = test.obsm[Key.BASELINE_MEAN]
    # the same training-mean profile for every test spot, over the genes asked for only (no NaN columns)
    assert list(mean.columns) == genes and mean.shape == (test.n_obs, 3)
    np.testing.assert_allclose(mean, np.broadcast_to(expected[:, cols].mean(0), (test.n_obs, 3)), rtol=1e-5)

    ridge = test.obsm[Key.BASELINE_RIDGE]
    assert list(ridge.columns) == genes and np.isfinite(ridge.to_numpy()).all()
    # the color-driven gene is followed by the ridge baseline, not by the mean
    truth = on_scale(test.X.toarray())[:, 2]
    assert np.corrcoef(ridge["KRT19"], truth)[0, 1] > 0.8
    scores = bt.tl.evaluate(test, layer=Key.BASELINE_RIDGE, scale=scale, library_key=None, key_added="ridge_eval")
    assert scores.loc[0, "n_genes"] == 3
    # the training table is not written to
    assert Key.BASELINE_MEAN not in train.obsm and Key.BASELINE_RIDGE not in train.obsm


@pytest.mark.parametrize(("train_color", "test_color"), [(True, False), (False, True), (False, False)])
def test_add_baselines_ridge_needs_color_on_both(train_color, test_color):
    train, test = _table(30, 0, color=train_color), _table(10, 1, color=test_color)
    bt.tl.add_baselines(train, test, genes=["EPCAM"], scale="log1p")
    assert Key.BASELINE_MEAN in test.obsm
    assert Key.BASELINE_RIDGE not in test.obsm


def test_add_baselines_bad_input():
    train, test = _table(30, 0), _table(10, 1)
    with pytest.raises(KeyError, match=r"not in `train.var_names`: 'MYC'"):
        bt.tl.add_baselines(train, test, genes=["EPCAM", "MYC"], scale="cp10k")
    with pytest.raises(KeyError, match=r"not in `test.var_names`: 'extra'"):
        bt.tl.add_baselines(train, test[:, :3].copy(), genes=["EPCAM", "extra"], scale="cp10k")
    with pytest.raises(ValueError, match="scale='tpm' is not supported"):
        bt.tl.add_baselines(train, test, genes=["EPCAM"], scale="tpm")
    with pytest.raises(ValueError, match="at least 2 training spots"):
        bt.tl.add_baselines(train[:1].copy(), test, genes=["EPCAM"], scale="cp10k")
    with pytest.raises(ValueError, match="`genes` is empty"):
        bt.tl.add_baselines(train, test, genes=[], scale="cp10k")
    other = test.copy()
    other.obsm[Key.COLOR_STATS] = other.obsm[Key.COLOR_STATS][:, :10]
    with pytest.raises(ValueError, match="columns"):
        bt.tl.add_baselines(train, other, genes=["EPCAM"], scale="cp10k")
    negative = train.copy()
    negative.X = sp.csr_matrix(-negative.X.toarray())
    with pytest.raises(ValueError, match="negative"):
        bt.tl.add_baselines(negative, test, genes=["EPCAM"], scale="log1p")
    assert Key.BASELINE_MEAN not in test.obsm  # nothing written on error
