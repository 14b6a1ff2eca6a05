"""BiTro's low-rank gene space (``gene_rank``) and its basis from other sections (``gene_reference``)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import bitro as bt

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = {"dim": 16, "heads": 2, "ff_dim": 32, "max_context": 16, "context_radius": 60.0, "batch_size": 8}
TINY.update(n_members=1, epochs=3, patience=3)


def _reference(spots, n_sections=3, seed=1):
    """Other sections' raw counts on the same genes (plus one gene the spots lack)."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(5.0, size=(20 * n_sections, spots.n_vars + 1)).astype(np.float32)
    obs = pd.DataFrame({"sample": np.repeat([f"R{i}" for i in range(n_sections)], 20)})
    obs.index = obs.index.astype(str)
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[*map(str, spots.var_names), "OTHER"]))


def test_gene_rank_factors_the_gene_weights(toy_tl):
    spots, cells = toy_tl
    model = bt.tl.fit(spots, cells=cells, gene_rank=3, **TINY)
    net = model.nets[0]
    names = dict(net.named_parameters())
    assert "gene_weight" not in names and "gene_queries" not in names
    assert names["rank_weight"].shape == (3, 16) and names["rank_queries"].shape == (3, 16)
    basis = net.gene_basis
    assert basis.shape == (spots.n_vars, 3)
    # orthonormal axes of the training targets, scaled to unit root-mean-square entries
    gram = basis.T @ basis / spots.n_vars
    assert torch.allclose(gram, torch.eye(3), atol=1e-4)
    # every gene's output weights lie in the 3-dimensional gene space
    assert torch.linalg.matrix_rank(net.gene_weight.detach()) == 3
    bt.tl.predict(model, spots, cells=cells, coverage="spots")
    assert np.isfinite(spots.obsm["bitro_predicted"].to_numpy()).all()


def test_gene_rank_model_saves_and_loads(toy_tl, tmp_path):
    spots, cells = toy_tl
    model = bt.tl.fit(spots, cells=cells, gene_rank=2, rank_queries=False, **TINY)
    assert "gene_queries" in dict(model.nets[0].named_parameters())
    bt.tl.predict(model, spots, cells=cells, coverage="spots")
    before = spots.obsm["bitro_predicted"].to_numpy().copy()
    model.save(tmp_path / "m")
    loaded = bt.tl.load_model(tmp_path / "m")
    assert torch.equal(loaded.nets[0].gene_basis, model.nets[0].gene_basis)
    bt.tl.predict(loaded, spots, cells=cells, coverage="spots")
    np.testing.assert_allclose(spots.obsm["bitro_predicted"].to_numpy(), before, rtol=1e-5, atol=1e-5)


def test_gene_reference_spans_the_basis(toy_tl):
    spots, cells = toy_tl
    reference = _reference(spots)
    own = bt.tl.fit(spots, cells=cells, gene_rank=2, **TINY)
    other = bt.tl.fit(spots, cells=cells, gene_rank=2, gene_reference=reference, **TINY)
    assert not torch.allclose(own.nets[0].gene_basis, other.nets[0].gene_basis, atol=1e-3)
    assert other.config.training["gene_reference"] == {
        "n_obs": reference.n_obs,
        "n_vars": reference.n_vars,
        "samples": ["R0", "R1", "R2"],
    }


def test_reference_targets_centre_each_section(toy_tl):
    from bitro.tl._targets import ZScore, reference_targets

    spots, _ = toy_tl
    reference = _reference(spots)
    genes = list(map(str, spots.var_names))
    z = reference_targets(reference, genes, "cp10k", ZScore(np.zeros(len(genes)), np.full(len(genes), 2.0)))
    assert z.shape == (reference.n_obs, len(genes))
    for s in ("R0", "R1", "R2"):
        np.testing.assert_allclose(z[(reference.obs["sample"] == s).to_numpy()].mean(0), 0, atol=1e-5)
    # cp10k of a gene: its share of the whole library, OTHER included
    x = reference.X
    want = np.log1p(1e4 * x[:, 0] / x.sum(1)) / 2.0
    rows = (reference.obs["sample"] == "R0").to_numpy()
    np.testing.assert_allclose(z[rows, 0], want[rows] - want[rows].mean(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"gene_reference": "atlas", "gene_rank": 2}, TypeError, "must be an AnnData"),
        ({"gene_reference": "REF", "gene_rank": 0}, ValueError, "option, which is off"),
        ({"gene_reference": "FEW", "gene_rank": 2}, ValueError, "measures 1 of the model's"),
        ({"gene_reference": "NOSAMPLE", "gene_rank": 2}, ValueError, "sections in `.obs"),
        ({"gene_rank": -1}, ValueError, "gene_rank"),
    ],
)
def test_bad_gene_space(toy_tl, kwargs, error, match):
    spots, cells = toy_tl
    reference = _reference(spots)
    kwargs = dict(kwargs)
    if kwargs.get("gene_reference") == "REF":
        kwargs["gene_reference"] = reference
    elif kwargs.get("gene_reference") == "FEW":
        kwargs["gene_reference"] = reference[:, [0, spots.n_vars]].copy()
    elif kwargs.get("gene_reference") == "NOSAMPLE":
        kwargs["gene_reference"] = ad.AnnData(reference.X, var=reference.var)
    before = spots.copy()
    with pytest.raises(error, match=match):
        bt.tl.fit(spots, cells=cells, **{**TINY, **kwargs})
    assert spots.obsm.keys() == before.obsm.keys() and spots.obs.equals(before.obs)


def test_transfer_gives_new_genes_rows_of_the_gene_space(toy_tl):
    spots, cells = toy_tl
    genes = list(map(str, spots.var_names))
    model = bt.tl.fit(spots, cells=cells, genes=genes[:8], gene_rank=2, **TINY)
    tuned = bt.tl.transfer(model, spots, "spot", cells=cells, genes=genes[4:], epochs=2)
    basis = tuned.nets[0].gene_basis
    new = [tuned.genes.index(g) for g in genes[8:]]
    old = [tuned.genes.index(g) for g in genes[4:8]]
    assert basis.shape == (len(genes) - 4, 2)
    assert torch.equal(basis[old], model.nets[0].gene_basis[4:8])  # carried by symbol
    assert (basis[new].abs().sum(1) > 0).all()  # fitted from the target data, not left at 0
    bt.tl.predict(tuned, spots, cells=cells, coverage="spots")
    assert np.isfinite(spots.obsm["bitro_predicted"].to_numpy()).all()


def test_lora_retrains_the_gene_space_factors_not_the_basis(toy_tl):
    """With a gene space, LoRA fine-tuning retrains the low-rank gene head (the factors, biases and size terms): a few
    hundred weights instead of two rows per gene; the basis and every frozen layer stay as they were."""
    spots, cells = toy_tl
    model = bt.tl.fit(spots, cells=cells, gene_rank=2, **TINY)
    base = {k: v.clone() for k, v in model.nets[0].state_dict().items()}
    tuned = bt.tl.transfer(model, spots, "spot", cells=cells, epochs=2, lr=1e-2)
    net = tuned.nets[0]
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    head = {"rank_queries", "rank_weight", "gene_bias", "gene_size"}
    assert head <= trainable and trainable - head == {n for n in trainable if ".lora_" in n}
    after = {k.replace(".base_layer", ""): v for k, v in net.state_dict().items() if ".lora_" not in k}
    assert torch.equal(after["gene_basis"], base["gene_basis"])
    assert not torch.equal(after["rank_weight"], base["rank_weight"])
    assert after["bank"].shape == base["bank"].shape  # retrieval from the fine-tuning spots (here: the same spots)
    assert all(torch.equal(after[k], v) for k, v in base.items() if k not in head | {"bank"})
    info = tuned.config.transfer
    assert info["n_trained"] == sum(p.numel() for n, p in net.named_parameters() if p.requires_grad)
