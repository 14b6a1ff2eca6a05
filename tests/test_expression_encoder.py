"""bt.tl.expression_encoder (scVI / scANVI through scvi-tools), its persistence, and bt.tl.integration_scores.

Simulated counts: three regions (niches) with their own expression programmes, in two patients whose genes are
scaled by a patient-specific factor (the batch effect). The tests fail when the encoder does not mix the patients
better than log1p CP10k PCA of the same width, or when scANVI's transfer does no better than the majority class.
"""

from __future__ import annotations

import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import bitro as bt
from bitro._constants import Key

pytest.importorskip("scvi")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

REGIONS = np.array(["tumour", "stroma", "immune"])


def toy_counts(n: int = 200, n_genes: int = 80, patients=("P1", "P2"), seed: int = 0, batch_sd: float = 0.5):
    """Poisson counts of three region programmes, each patient's genes scaled by a log-normal batch factor."""
    rng = np.random.default_rng(seed)
    programme = rng.gamma(1.0, 1.0, size=(3, n_genes)) ** 2 + 0.05
    x, obs = [], []
    for p in patients:
        effect = rng.lognormal(0, batch_sd, size=n_genes)
        region = rng.integers(0, 3, n)
        depth = rng.lognormal(np.log(20), 0.3, size=(n, 1)) / programme.mean()
        x.append(rng.poisson(programme[region] * effect * depth))
        obs.append(pd.DataFrame({"patient": p, "region": REGIONS[region]}))
    obs = pd.concat(obs, ignore_index=True)
    obs.index = [f"s{i}" for i in range(len(obs))]
    return ad.AnnData(
        sp.csr_matrix(np.vstack(x).astype(np.float32)),
        obs=obs,
        var=pd.DataFrame(index=[f"G{g}" for g in range(n_genes)]),
    )


@pytest.fixture(scope="module")
def scvi_encoder():
    import torch

    torch.set_num_threads(1)
    data = toy_counts()
    return data, bt.tl.expression_encoder(
        data.copy(), batch_key="patient", n_top_genes=None, n_latent=5, max_epochs=100, batch_size=64
    )


@pytest.fixture(scope="module")
def scanvi_encoder():
    import torch

    torch.set_num_threads(1)
    data = toy_counts(seed=1)
    train = data.copy()
    train.obs.loc[train.obs_names[1::2], "region"] = np.nan  # half the spots unlabelled
    enc = bt.tl.expression_encoder(
        train, batch_key="patient", labels_key="region", n_top_genes=50, n_latent=5, max_epochs=30, scanvi_epochs=5
    )
    return data, enc


def test_scvi_mixes_patients_better_than_pca(scvi_encoder):
    data, enc = scvi_encoder
    data = data.copy()
    z = enc.embed(data)
    assert z.shape == (data.n_obs, 5) and Key.EXPRESSION_LATENT in data.obsm
    bt.tl.log1p_pca(data, n_comps=5)
    latent = bt.tl.integration_scores(data, use_rep=Key.EXPRESSION_LATENT, labels_key="region")
    pca = bt.tl.integration_scores(data, use_rep="X_pca", labels_key="region")
    assert latent["batch_mixing"] > pca["batch_mixing"] + 0.05, (latent, pca)
    assert latent["label_separation"] > 0.7, latent
    assert enc.method == "scvi" and enc.batches == ["P1", "P2"] and enc.labels == []


def test_embeds_an_unseen_patient_and_leaves_the_table_alone(scvi_encoder):
    _, enc = scvi_encoder
    new = toy_counts(n=50, patients=("P9",), seed=3)
    before = new.copy()
    z = enc.embed(new, key_added=None)
    assert z.shape == (50, 5) and np.isfinite(z).all()
    assert list(new.obsm) == [] and new.obs.equals(before.obs) and (new.X != before.X).nnz == 0
    # the batch a query is labelled with does not matter: the encoder does not read it
    renamed = new.copy()
    renamed.obs["patient"] = "P1"
    np.testing.assert_allclose(enc.embed(renamed, key_added=None), z, atol=1e-5)
    # genes missing from the query are read as zeros, with a warning; too many missing is refused
    with pytest.raises(ValueError, match="lacks 60 of the encoder's 80 genes"):
        enc.embed(new[:, :20].copy())


def test_save_and_load_without_pickle(scvi_encoder, scanvi_encoder, tmp_path):
    for data, enc in (scvi_encoder, scanvi_encoder):
        folder = enc.save(tmp_path / enc.method)
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "weights.safetensors"]
        back = bt.tl.load_expression_encoder(folder)
        assert back.config == enc.config
        np.testing.assert_allclose(back.embed(data, key_added=None), enc.embed(data, key_added=None), atol=1e-6)
    back = bt.tl.load_expression_encoder(tmp_path / "scanvi")
    np.testing.assert_allclose(
        back.transfer_labels(data, key_added=None)["confidence"],
        enc.transfer_labels(data, key_added=None)["confidence"],
    )
    with pytest.raises(FileNotFoundError, match="not a saved expression encoder"):
        bt.tl.load_expression_encoder(tmp_path)


def test_scanvi_transfers_labels_with_confidence(scanvi_encoder):
    data, enc = scanvi_encoder
    data = data.copy()
    out = enc.transfer_labels(data)
    assert list(out.columns[:2]) == ["label", "confidence"] and sorted(enc.labels) == sorted(REGIONS)
    assert ((out["confidence"] > 0) & (out["confidence"] <= 1)).all()
    np.testing.assert_allclose(out[enc.labels].sum(axis=1), 1, atol=1e-5)
    accuracy = float((out["label"].astype(str) == data.obs["region"]).mean())
    majority = data.obs["region"].value_counts(normalize=True).max()
    assert accuracy > majority + 0.3, (accuracy, majority)
    assert data.obs[Key.TRANSFERRED].dtype == "category"
    assert (data.obs[Key.TRANSFERRED] == out["label"]).all()
    assert f"{Key.TRANSFERRED}_confidence" in data.obs


def test_normalized_expression_is_batch_free(scvi_encoder):
    """The decoded expression sums to 1 per spot and does not depend on the patient a spot is labelled with."""
    _, enc = scvi_encoder
    new = toy_counts(n=40, patients=("P9",), seed=0)  # the training data's gene programmes (seed 0)
    rate = enc.normalized_expression(new)
    assert rate.shape == (40, 80) and list(rate.columns) == enc.genes and list(rate.index) == list(new.obs_names)
    np.testing.assert_allclose(rate.sum(axis=1), 1.0, rtol=1e-4)
    renamed = new.copy()
    renamed.obs["patient"] = "P1"
    np.testing.assert_allclose(enc.normalized_expression(renamed).to_numpy(), rate.to_numpy(), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="n_samples"):
        enc.normalized_expression(new, n_samples=0)
    # decoded from the latent: each spot's decoded profile follows its measured one
    x = np.asarray(new.X.todense())
    share, decoded = x / x.sum(axis=1, keepdims=True), rate[list(new.var_names)].to_numpy()
    assert np.median([np.corrcoef(share[i], decoded[i])[0, 1] for i in range(40)]) > 0.8


def test_scvi_cannot_transfer_labels(scvi_encoder):
    data, enc = scvi_encoder
    with pytest.raises(ValueError, match="without labels"):
        enc.transfer_labels(data)


@pytest.mark.parametrize(
    ("edit", "kwargs", "exc", "match"),
    [
        (lambda a: setattr(a, "X", a.X * 0.5), {}, ValueError, "non-integer values"),
        (
            lambda a: None,
            {"batch_key": "donor"},
            KeyError,
            r"not a column of `adata.obs` \(columns: \['patient', 'region'\]\)",
        ),
        (lambda a: None, {"labels_key": "tissue"}, KeyError, "`labels_key='tissue'` is not a column"),
        (lambda a: None, {"method": "scanvi"}, ValueError, "needs `labels_key=`"),
        (lambda a: None, {"method": "pca"}, ValueError, "`method='pca'`"),
        (lambda a: None, {"labels_key": "region", "unlabeled_category": "tumour"}, ValueError, "also a label"),
        (lambda a: None, {"max_epochs": 0}, ValueError, "`max_epochs`"),
        (lambda a: None, {"layer": "counts"}, KeyError, "not a layer"),
    ],
)
def test_bad_input_is_refused_before_training(edit, kwargs, exc, match):
    data = toy_counts(n=20, n_genes=10)
    edit(data)
    before = data.copy()
    with pytest.raises(exc, match=match):
        bt.tl.expression_encoder(data, **{"max_epochs": 1, "n_top_genes": None, **kwargs})
    assert data.obs.equals(before.obs) and np.array_equal(data.X.toarray(), before.X.toarray())


def test_single_batch_warns(monkeypatch):
    data = toy_counts(n=30, n_genes=10, patients=("P1",))
    with pytest.warns(UserWarning, match="single batch"):
        enc = bt.tl.expression_encoder(data, n_top_genes=None, max_epochs=1, n_latent=2)
    assert enc.embed(data, key_added=None).shape == (30, 2)


def test_without_scvi_tools_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "scvi", None)
    with pytest.raises(ImportError, match=r"pip install 'bitro\[scvi\]'"):
        bt.tl.expression_encoder(toy_counts(n=10, n_genes=5), n_top_genes=None, max_epochs=1)


def test_integration_scores_checks_its_arguments(scvi_encoder):
    data, _ = scvi_encoder
    with pytest.raises(KeyError, match="not in `adata.obsm`"):
        bt.tl.integration_scores(data, use_rep="X_nothing")
    one = data[data.obs["patient"] == "P1"].copy()
    one.obsm["X_pca"] = np.zeros((one.n_obs, 2))
    with pytest.raises(ValueError, match="single batch"):
        bt.tl.integration_scores(one, use_rep="X_pca")


def test_spots_without_counts_are_left_out_of_training(caplog_bitro):
    data = toy_counts(n=30, n_genes=10)
    x = data.X.toarray()
    x[0] = 0
    data.X = sp.csr_matrix(x)
    enc = bt.tl.expression_encoder(data, n_top_genes=None, max_epochs=1, n_latent=2)
    assert "1 spots without counts" in caplog_bitro.text
    assert enc.config["n_spots"] == 59 and np.isfinite(enc.embed(data, key_added=None)).all()
