from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import bitro as bt
from bitro._constants import Key


def _pearson(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def _js(p, q):
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(x, y):
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / y[nz])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@pytest.fixture
def spots():
    """Two sections x 6 spots, 5 genes; gene 'const' is constant in section 'a'; gene 'extra' is not predicted."""
    rng = np.random.default_rng(0)
    genes = ["EPCAM", "ERBB2", "const", "KRT19", "extra"]
    x = rng.poisson(6, (12, 5)).astype(float) + 1
    x[:6, 2] = 4.0  # zero variance (in counts) in section a
    obs = pd.DataFrame({Key.SAMPLE: ["a"] * 6 + ["b"] * 6}, index=[f"s{i}" for i in range(12)])
    adata = ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=genes))
    pred = np.log1p(x) + rng.normal(0, 0.4, x.shape)
    pred[:, 4] = np.nan
    adata.layers[Key.PREDICTED] = pred
    return adata


def test_evaluate_log1p_matches_hand_computation(spots):
    x = spots.X.toarray()
    pred = spots.layers[Key.PREDICTED]
    table = bt.tl.evaluate(spots, scale="log1p")

    truth = np.log1p(x[:, :4])
    for group, rows in (("a", slice(0, 6)), ("b", slice(6, 12))):
        row = table.set_index(Key.SAMPLE).loc[group]
        t, p = truth[rows], pred[rows, :4]
        per_gene = [np.nan if t[:, j].std() == 0 else _pearson(p[:, j], t[:, j]) for j in range(4)]
        assert row["pcc_gene"] == pytest.approx(np.nanmean(per_gene))
        assert row["pcc_overall"] == pytest.approx(np.mean([_pearson(p[i], t[i]) for i in range(6)]))
        assert row["n_genes_constant"] == int(np.isnan(per_gene).sum())
        js = np.mean([_js(np.clip(np.expm1(p[i]), 0, None), np.expm1(t[i])) for i in range(6)])
        assert row["js_divergence"] == pytest.approx(js)
        np.testing.assert_allclose(spots.var[f"{Key.EVALUATION}_pcc_{group}"].to_numpy()[:4], per_gene)
    # the zero-variance gene: NaN in section a, left out of a's mean, counted in the output
    summary = table.set_index(Key.SAMPLE)
    assert summary.loc["a", "n_genes_constant"] == 1 and summary.loc["b", "n_genes_constant"] == 0
    assert summary.loc["a", "n_genes"] == 4
    assert np.isnan(spots.var.loc["extra", f"{Key.EVALUATION}_pcc"])
    # mean over groups per gene: the constant gene only has section b's value
    assert spots.var.loc["const", f"{Key.EVALUATION}_pcc"] == pytest.approx(
        spots.var.loc["const", f"{Key.EVALUATION}_pcc_b"]
    )
    assert spots.obs[f"{Key.EVALUATION}_pcc"].iloc[0] == pytest.approx(_pearson(pred[0, :4], truth[0]))
    assert spots.uns[Key.EVALUATION]["mean"]["pcc_gene"] == pytest.approx(table["pcc_gene"].mean())
    assert list(spots.uns[Key.EVALUATION]["genes"]) == ["EPCAM", "ERBB2", "const", "KRT19"]
    assert spots.uns[Key.UNS][Key.EVALUATE][Key.EVALUATION]["scale"] == "log1p"  # the record of this key_added


def test_evaluate_cp10k_uses_library_size_of_all_genes(spots):
    x = spots.X.toarray()
    spots.uns[Key.UNS] = {"predict": {"scale": "cp10k"}}  # as recorded by bt.tl.predict
    table = bt.tl.evaluate(spots, library_key=None)
    truth = np.log1p(1e4 * x / x.sum(axis=1, keepdims=True))[:, :4]
    pred = spots.layers[Key.PREDICTED][:, :4]
    expected = np.nanmean([_pearson(pred[:, j], truth[:, j]) for j in range(4)])
    assert table.loc[0, "group"] == "all" and table.loc[0, "n_obs"] == 12
    assert table.loc[0, "pcc_gene"] == pytest.approx(expected)
    assert spots.uns[Key.EVALUATION]["scale"] == "cp10k"


def test_evaluate_truth_layer_and_unpredicted_rows(spots):
    truth = np.log1p(spots.X.toarray())
    spots.layers["truth"] = truth
    spots.layers[Key.PREDICTED][:6] = np.nan  # only section b predicted (held out)
    table = bt.tl.evaluate(spots, truth="truth", key_added="ev")
    assert list(table[Key.SAMPLE]) == ["b"]
    assert np.isnan(spots.obs["ev_pcc"].iloc[:6]).all()
    pred = spots.layers[Key.PREDICTED][6:, :4]
    assert table.loc[0, "pcc_gene"] == pytest.approx(np.mean([_pearson(pred[:, j], truth[6:, j]) for j in range(4)]))


def test_evaluate_bulk_js(spots):
    bulk = ad.AnnData(np.array([[10.0, 30.0, 60.0], [5.0, 5.0, 90.0]]), obs=pd.DataFrame(index=["A1", "B1"]))
    bulk.layers[Key.PREDICTED] = np.log1p(np.array([[20.0, 20.0, 60.0], [5.0, 5.0, 90.0]]))
    table = bt.tl.evaluate(bulk, scale="log1p", library_key=None)
    expected = np.mean([_js(np.array([20.0, 20, 60]), np.array([10.0, 30, 60])), 0.0])
    assert table.loc[0, "js_divergence"] == pytest.approx(expected, abs=1e-9)


def test_evaluate_accepts_spatialdata(spots):
    from spatialdata import SpatialData

    sdata = SpatialData(tables={Key.SPOTS_TABLE: spots})
    table = bt.tl.evaluate(sdata, scale="log1p")
    assert len(table) == 2
    assert f"{Key.EVALUATION}_pcc" in sdata.tables[Key.SPOTS_TABLE].var


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layer": "missing", "scale": "log1p"}, KeyError, r"bt\.tl\.predict"),
        ({}, ValueError, "scale="),
        ({"scale": "tpm"}, ValueError, "cp10k"),
        ({"scale": "log1p", "library_key": "batch"}, KeyError, "library_key=None"),
        ({"truth": "nope"}, KeyError, "Truth layer"),
        ({"scale": "log1p", "key_added": ""}, ValueError, "key_added"),
    ],
)
def test_evaluate_bad_input_leaves_data_untouched(spots, kwargs, error, match):
    before = spots.copy()
    with pytest.raises(error, match=match):
        bt.tl.evaluate(spots, **kwargs)
    assert list(spots.var.columns) == list(before.var.columns)
    assert list(spots.obs.columns) == list(before.obs.columns)
    assert set(spots.uns) == set(before.uns)


def test_evaluate_rejects_negative_counts(spots):
    spots.X = spots.X.toarray() - 100
    with pytest.raises(ValueError, match="negative"):
        bt.tl.evaluate(spots, scale="log1p")
    assert f"{Key.EVALUATION}_pcc" not in spots.var


def test_evaluate_no_finite_prediction(spots):
    spots.layers[Key.PREDICTED] = np.full(spots.shape, np.nan)
    with pytest.raises(ValueError, match=r"bt\.tl\.predict"):
        bt.tl.evaluate(spots, scale="log1p")


def test_evaluate_js_leaves_out_empty_profiles(spots):
    x = spots.X.toarray()
    x[0, :4] = 0  # a spot with no count in the predicted genes: its JS divergence is undefined
    spots.X = x
    table = bt.tl.evaluate(spots, scale="log1p")
    pred = spots.layers[Key.PREDICTED]
    expected = np.mean([_js(np.clip(np.expm1(pred[i, :4]), 0, None), x[i, :4]) for i in range(1, 6)])
    assert table.loc[0, "js_divergence"] == pytest.approx(expected)


def test_evaluate_genes_from_predict_frame(spots):
    # bt.tl.predict also writes the model's genes as a DataFrame in .obsm[layer]; only those are scored
    spots.obsm[Key.PREDICTED] = pd.DataFrame(
        spots.layers[Key.PREDICTED][:, :2], index=spots.obs_names, columns=["EPCAM", "ERBB2"]
    )
    table = bt.tl.evaluate(spots, scale="log1p")
    assert (table["n_genes"] == 2).all()
    assert list(spots.uns[Key.EVALUATION]["genes"]) == ["EPCAM", "ERBB2"]


def test_evaluate_results_survive_h5ad_round_trip(spots, tmp_path):
    table = bt.tl.evaluate(spots, scale="log1p")
    spots.write_h5ad(tmp_path / "spots.h5ad")
    back = ad.read_h5ad(tmp_path / "spots.h5ad")
    pd.testing.assert_frame_equal(back.uns[Key.EVALUATION]["summary"], table, check_dtype=False)
    np.testing.assert_allclose(back.var[f"{Key.EVALUATION}_pcc"], spots.var[f"{Key.EVALUATION}_pcc"])


def test_js_divergence_of_equal_profiles_is_zero_not_nan():
    from scipy.spatial.distance import jensenshannon

    from bitro.tl._metrics import js_divergence

    rng = np.random.default_rng(0)
    p = rng.gamma(0.3, size=(50, 785))
    assert js_divergence(p, p * (1 + 1e-15)) == pytest.approx(0.0, abs=1e-12)  # scipy's form gives NaN for some rows
    q = rng.gamma(0.3, size=(50, 785))
    assert js_divergence(p, q) == pytest.approx(np.mean(jensenshannon(p, q, axis=1, base=2) ** 2), rel=1e-9)
