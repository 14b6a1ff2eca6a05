"""bt.tl.reduced_rank_ridge, the rrr row of bt.tl.add_baselines, and bt.datasets.her2st_atlas."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import bitro as bt
from bitro._constants import Key
from bitro.tl._baselines import ridge_predict
from bitro.tl._metrics import pcc_gene
from bitro.tl._targets import to_scale


def _low_rank(seed: int, *, n_sections=4, n_spots=30, n_genes=100, n_features=60, rank=3, n_test=80):
    """Training sections and a test section whose log expression is rank ``rank`` in the features, plus noise.

    Poisson counts around ``exp(mu + z @ w)``, ``z = x @ b + noise``: each gene is a mix of 3 programmes, so a
    regression through 3 components pools the genes' noise away where one ridge per gene fits it.
    """
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(rank, n_genes)) * 0.4
    b = rng.normal(size=(n_features, rank)) / np.sqrt(n_features)
    mu = rng.normal(2.0, 0.5, size=n_genes)
    genes = [f"G{g}" for g in range(n_genes)]

    def table(sections, n_per, prefix):
        n = len(sections) * n_per
        x = rng.normal(size=(n, n_features))
        z = x @ b + rng.normal(size=(n, rank)) * 0.5
        counts = rng.poisson(np.exp(mu + z @ w)).astype(np.float32)
        obs = pd.DataFrame({Key.SAMPLE: np.repeat(sections, n_per)}, index=[f"{prefix}{i}" for i in range(n)])
        a = ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes))
        a.obsm[Key.COLOR_STATS] = x
        return a

    return table([f"S{i}" for i in range(n_sections)], n_spots, "tr"), table(["T"], n_test, "te")


def test_beats_plain_ridge_on_low_rank_data():
    margins = []
    for seed in range(4):
        train, test = _low_rank(seed)
        genes = list(train.var_names)
        bt.tl.add_baselines(train, test, genes=genes, scale="log1p", n_components=3)
        truth = np.log1p(test.X.toarray())
        ridge = pcc_gene(test.obsm[Key.BASELINE_RIDGE].to_numpy(), truth)
        rrr = pcc_gene(test.obsm[Key.BASELINE_RRR].to_numpy(), truth)
        margins.append(rrr - ridge)
    # measured: +0.066, +0.086, +0.096, +0.073 (PCC_gene about 0.50-0.58 for ridge)
    assert min(margins) > 0.03 and np.mean(margins) > 0.05, margins


def test_function_writes_and_returns_the_predictions():
    train, test = _low_rank(0, n_genes=20)
    genes = ["G3", "G1", "G7"]
    frame = bt.tl.reduced_rank_ridge(train, test, genes=genes, scale="cp10k", n_components=2, key_added="rrr")
    assert list(frame.columns) == genes and frame.index.equals(test.obs_names) and frame.dtypes.eq(np.float32).all()
    assert test.obsm["rrr"] is frame and np.isfinite(frame.to_numpy()).all()
    scores = bt.tl.evaluate(test, layer="rrr", scale="cp10k", library_key=None, key_added="rrr_eval")
    assert scores.loc[0, "n_genes"] == 3
    assert "rrr" not in train.obsm  # the training table is not written to


def test_full_rank_equals_plain_ridge():
    """With as many components as genes (and no centring) the basis is a rotation: the plain ridge, exactly."""
    train, test = _low_rank(1, n_genes=8, n_features=10)
    genes = list(train.var_names)
    pred = bt.tl.reduced_rank_ridge(train, test, genes=genes, scale="log1p", n_components=8, library_key=None)
    y = np.log1p(train.X.toarray())
    plain = ridge_predict(train.obsm[Key.COLOR_STATS], y, test.obsm[Key.COLOR_STATS])
    np.testing.assert_allclose(pred.to_numpy(), plain, rtol=1e-4, atol=1e-4)


def test_the_basis_comes_from_the_reference():
    train, test = _low_rank(2, n_genes=30)
    genes = list(train.var_names)
    own = bt.tl.reduced_rank_ridge(train, test, genes=genes, scale="hist2st", n_components=3, key_added="own")
    # the training spots as the reference: the same basis, the same predictions
    same = bt.tl.reduced_rank_ridge(
        train, test, genes=genes, scale="hist2st", n_components=3, reference=train.copy(), key_added="same"
    )
    np.testing.assert_allclose(own.to_numpy(), same.to_numpy(), rtol=1e-5, atol=1e-5)
    # another reference with the same programmes (other spots, expression only) also works, and differs
    other, _ = _low_rank(2, n_sections=6, n_genes=30)
    other.obs[Key.SAMPLE] = "ref_" + other.obs[Key.SAMPLE].astype(str)
    del other.obsm[Key.COLOR_STATS]
    ref = bt.tl.reduced_rank_ridge(train, test, genes=genes, scale="hist2st", n_components=3, reference=other)
    assert not np.allclose(ref.to_numpy(), own.to_numpy()) and np.isfinite(ref.to_numpy()).all()
    # genes the reference lacks are decoded from the training spots' scores
    partial = other[:, genes[5:]].copy()
    part = bt.tl.reduced_rank_ridge(train, test, genes=genes, scale="cp10k", n_components=3, reference=partial)
    assert np.isfinite(part.to_numpy()).all()
    truth = to_scale(test.X.toarray(), "cp10k")
    assert np.nanmean([np.corrcoef(part.iloc[:, g], truth[:, g])[0, 1] for g in range(5)]) > 0.2


def test_add_baselines_caps_the_components():
    """add_baselines fits the rrr row whenever the color statistics are there, with fewer components if need be."""
    train, test = _low_rank(3, n_genes=4)
    bt.tl.add_baselines(train, test, genes=["G0", "G1"], scale="cp10k")  # n_components=10 > 2 genes
    assert np.isfinite(test.obsm[Key.BASELINE_RRR].to_numpy()).all()
    _, no_color = _low_rank(3, n_genes=4)
    del no_color.obsm[Key.COLOR_STATS]
    bt.tl.add_baselines(train, no_color, genes=["G0"], scale="cp10k")
    assert Key.BASELINE_RRR not in no_color.obsm and Key.BASELINE_RIDGE not in no_color.obsm
    # two training spots in two sections leave no variation within sections: no rrr row, the others as before
    two, held = _low_rank(3, n_genes=4)
    bt.tl.add_baselines(two[[0, 30]].copy(), held, genes=["G0"], scale="cp10k")
    assert Key.BASELINE_RIDGE in held.obsm and Key.BASELINE_RRR not in held.obsm


def _bad_cases():
    def drop_test_features(train, test, ref):
        del test.obsm[Key.COLOR_STATS]
        return {}

    def narrow_test(train, test, ref):
        test.obsm[Key.COLOR_STATS] = test.obsm[Key.COLOR_STATS][:, :5]
        return {}

    def nan_features(train, test, ref):
        train.obsm[Key.COLOR_STATS][0, 0] = np.nan
        return {}

    def other_genes(train, test, ref):
        ref.var_names = [f"X{i}" for i in range(ref.n_vars)]
        return {"reference": ref}

    def few_shared(train, test, ref):
        return {"reference": ref[:, :2].copy(), "n_components": 3}

    def leaked(train, test, ref):
        ref.obs[Key.SAMPLE] = "T"
        return {"reference": ref}

    def no_sample(train, test, ref):
        del train.obs[Key.SAMPLE]
        return {}

    return [
        ({"use_rep": "X_missing"}, KeyError, r"`train.obsm` has no 'X_missing'"),
        (drop_test_features, KeyError, r"`test.obsm` has no 'bitro_color' \(compute them with"),
        (narrow_test, ValueError, r"has 60 columns in `train` but 5 in `test`"),
        (nan_features, ValueError, r"NaN or infinite values in 1 rows"),
        ({"n_components": 0}, ValueError, r"`n_components` must be a positive integer"),
        ({"n_components": 2.5}, TypeError, r"`n_components` must be an integer"),
        ({"n_components": True}, TypeError, r"`n_components` must be an integer"),
        ({"n_components": 21}, ValueError, r"n_components=21 is more than the 20 components the training spots"),
        (other_genes, KeyError, r"The reference shares none of the 20 genes"),
        (
            few_shared,
            ValueError,
            r"n_components=3 is more than the 2 components the reference can give .*2 genes shared",
        ),
        (leaked, ValueError, r"The reference holds the test section\(s\) \['T'\]"),
        ({"reference": "atlas"}, TypeError, r"`reference` must be an AnnData"),
        (no_sample, KeyError, r"`library_key='sample'` is not a column of `train.obs`"),
        ({"genes": ["G0", "MYC"]}, KeyError, r"1 of the 2 genes are not in `train.var_names`: 'MYC'"),
        ({"genes": []}, ValueError, r"`genes` is empty"),
        ({"key_added": ""}, ValueError, r"`key_added` must be a non-empty string"),
    ]


@pytest.mark.parametrize(("change", "error", "match"), _bad_cases())
def test_bad_input(change, error, match):
    train, test = _low_rank(0, n_genes=20)
    ref = train.copy()
    ref.obs[Key.SAMPLE] = "ref_" + ref.obs[Key.SAMPLE].astype(str)
    kwargs = {"genes": list(train.var_names), "scale": "cp10k", "n_components": 3}
    kwargs.update(change if isinstance(change, dict) else change(train, test, ref))
    train_before, test_before = train.copy(), test.copy()
    with pytest.raises(error, match=match):
        bt.tl.reduced_rank_ridge(train, test, **kwargs)
    # nothing of the user's was modified
    assert set(test.obsm) == set(test_before.obsm) and set(train.obsm) == set(train_before.obsm)
    assert Key.BASELINE_RRR not in test.obsm


def test_bad_tables():
    train, test = _low_rank(0, n_genes=20)
    genes = list(train.var_names)
    with pytest.raises(TypeError, match="`train` must be an AnnData"):
        bt.tl.reduced_rank_ridge(train.X, test, genes=genes, scale="cp10k")
    with pytest.raises(ValueError, match="at least 2 training spots"):
        bt.tl.reduced_rank_ridge(train[:1].copy(), test, genes=genes, scale="cp10k")
    with pytest.raises(ValueError, match="`test` has no rows"):
        bt.tl.reduced_rank_ridge(train, test[:0].copy(), genes=genes, scale="cp10k")
    negative = train.copy()
    negative.X = sp.csr_matrix(-negative.X.toarray())
    with pytest.raises(ValueError, match="negative"):
        bt.tl.reduced_rank_ridge(negative, test, genes=genes, scale="cp10k", n_components=2)
    one_section = train.copy()
    one_section.obs[Key.SAMPLE] = [f"s{i}" for i in range(one_section.n_obs)]  # every spot its own section
    with pytest.raises(ValueError, match="cannot give a gene basis"):
        bt.tl.reduced_rank_ridge(one_section, test, genes=genes, scale="cp10k")
    # add_baselines refuses a leaking reference before writing anything
    ref = train.copy()
    ref.obs[Key.SAMPLE] = "T"
    with pytest.raises(ValueError, match="holds the test section"):
        bt.tl.add_baselines(train, test, genes=genes, scale="cp10k", reference=ref)
    assert Key.BASELINE_MEAN not in test.obsm and Key.BASELINE_RRR not in test.obsm


# -- the atlas loader --------------------------------------------------------------------------------------------
def _atlas_folder(tmp_path):
    (tmp_path / "counts").mkdir()
    (tmp_path / "spots").mkdir()
    for sample, genes, rows in (("A1", ["G1", "G2"], ["1x1", "2x1", "3x3"]), ("B2", ["G2", "G0"], ["5x4"])):
        frame = pd.DataFrame(np.arange(len(rows) * 2).reshape(-1, 2), index=rows, columns=genes)
        frame.to_csv(tmp_path / "counts" / f"{sample}.tsv.gz", sep="\t")
        sel = pd.DataFrame([[int(v) for v in r.split("x")] for r in rows[:2]], columns=["x", "y"])
        sel[["pixel_x", "pixel_y"]] = 10.0
        sel.to_csv(tmp_path / "spots" / f"{sample}_selection.tsv", sep="\t", index=False)
    return tmp_path


def test_her2st_atlas_reads_a_folder(tmp_path, monkeypatch):
    folder = _atlas_folder(tmp_path)
    atlas = bt.datasets.her2st_atlas(path=folder)
    # spots under tissue only (the selection file): A1 loses 3x3
    assert atlas.n_obs == 3 and list(atlas.var_names) == ["G0", "G1", "G2"]
    assert atlas.obs[Key.SAMPLE].tolist() == ["A1", "A1", "B2"] and atlas.obs["patient"].tolist() == ["A", "A", "B"]
    assert atlas.obs[Key.SPOT_ID].tolist() == ["1x1", "2x1", "5x4"] and sp.issparse(atlas.X)
    # genes outer-joined with 0: B2's 5x4 had G2=0, G0=1
    np.testing.assert_array_equal(atlas.X.toarray(), [[0, 0, 1], [0, 2, 3], [1, 0, 0]])
    assert bt.datasets.her2st_atlas("B2", path=folder).n_obs == 1
    monkeypatch.setenv("BITRO_HER2ST_ATLAS_DIR", str(folder))
    assert bt.datasets.her2st_atlas().n_obs == 3
    monkeypatch.delenv("BITRO_HER2ST_ATLAS_DIR")
    monkeypatch.setattr(bt.settings, "data_dir", None)
    with pytest.raises(FileNotFoundError, match="No HER2ST atlas folder given"):
        bt.datasets.her2st_atlas()
    with pytest.raises(FileNotFoundError, match="No atlas in"):
        bt.datasets.her2st_atlas(path=tmp_path / "nowhere")
    with pytest.raises(KeyError, match=r"Sections \['Z9'\] not found"):
        bt.datasets.her2st_atlas(["Z9"], path=folder)
    with pytest.raises(ValueError, match="more than once"):
        bt.datasets.her2st_atlas(["A1", "A1"], path=folder)


def test_her2st_atlas_shared_copy():
    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st_atlas"
    if not folder.is_dir():
        pytest.skip("the shared HER2ST atlas is not beside the repository")
    atlas = bt.datasets.her2st_atlas(["B1", "H3"], path=folder)
    assert set(atlas.obs["patient"]) == {"B", "H"} and atlas.n_obs > 100
    assert atlas.uns["bitro"]["dataset"]["doi"] == "10.1038/s41467-021-26271-2"
