"""Retrieval blended with regression in BiTro (``retrieval_weight`` / ``retrieval_temperature`` of ``bt.tl.fit``)."""

from __future__ import annotations

import numpy as np
import pytest

import bitro as bt
from bitro.tl.models._bitro import BitroArchitecture, BitroNet

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = {"dim": 16, "heads": 2, "ff_dim": 32, "max_context": 16, "context_radius": 60.0, "batch_size": 8}
TINY.update(n_members=1, epochs=3, patience=3)


def _net(weight: float, temperature: float = 0.1, n_genes: int = 6) -> BitroNet:
    arch = BitroArchitecture(n_features=4, n_genes=n_genes, retrieval_weight=weight, retrieval_temperature=temperature)
    return BitroNet(arch)


def test_retrieve_blends_with_the_most_similar_training_profiles():
    net = _net(0.5, temperature=1e-3)  # a tiny temperature: the single most similar profile
    bank = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0], [0, 0, 2.0, 0, 0, 0]])
    net.prepare(bank)
    assert torch.equal(net.bank, bank)
    y = torch.tensor([[0.1, 0.0, 0.9, 0.0, 0.0, 0.0]])  # closest to the third profile
    out = net.retrieve(y)
    retrieved = y.norm() * bank[2] / bank[2].norm()  # rescaled to the prediction's norm
    torch.testing.assert_close(out, 0.5 * y + 0.5 * retrieved)
    assert torch.equal(_net(1.0, temperature=1e-3).retrieve(y), y)  # never prepared: no bank, unchanged
    net_all = _net(1.0, temperature=1e-3)
    net_all.prepare(bank)
    torch.testing.assert_close(net_all.retrieve(y), retrieved[None])  # weight 1: retrieval alone


def test_retrieval_off_has_no_bank_and_changes_nothing():
    net = _net(0.0)
    net.prepare(torch.randn(5, 6))
    assert not hasattr(net, "bank")
    y = torch.randn(3, 6)
    assert torch.equal(net.retrieve(y), y)


@pytest.mark.parametrize(("weight", "temperature"), [(-0.1, 0.1), (1.5, 0.1), (0.5, 0.0)])
def test_bad_retrieval_settings_are_refused(weight, temperature):
    with pytest.raises(ValueError, match="retrieval_weight"):
        BitroArchitecture(n_features=4, n_genes=6, retrieval_weight=weight, retrieval_temperature=temperature)


def test_fit_gives_spot_models_retrieval_and_saves_the_bank(toy_tl, tmp_path):
    spots, cells = toy_tl
    model = bt.tl.fit(spots, cells=cells, **TINY)
    arch = model.config.architecture
    assert arch.retrieval_weight == 0.5 and arch.retrieval_temperature == 0.1
    bank = model.nets[0].bank
    held = model.config.members[0]["validation_samples"]  # the section early stopping held out is not in the bank
    n_train = int((~spots.obs["sample"].astype(str).isin(held)).sum())
    assert 0 < n_train < spots.n_obs and bank.shape == (n_train, len(model.config.genes))
    bt.tl.predict(model, spots, cells=cells, coverage="spots")
    before = spots.obsm["bitro_predicted"].to_numpy().copy()
    model.save(tmp_path / "m")
    loaded = bt.tl.load_model(tmp_path / "m")
    assert torch.equal(loaded.nets[0].bank, bank)
    bt.tl.predict(loaded, spots, cells=cells, coverage="spots")
    np.testing.assert_allclose(spots.obsm["bitro_predicted"].to_numpy(), before, rtol=1e-5, atol=1e-5)


def test_retrieval_changes_the_spots_not_the_cells(toy_tl):
    spots, cells = toy_tl
    preds, cell_tables = {}, {}
    for w in (0.0, 1.0):  # the same network (same seed, no validation: retrieval plays no part in training)
        model = bt.tl.fit(spots, cells=cells, retrieval_weight=w, seed=3, validation=None, **TINY)
        s = spots.copy()
        cell_tables[w] = bt.tl.predict(model, s, cells=cells, coverage="spots")
        preds[w] = s.obsm["bitro_predicted"].to_numpy()
    assert np.abs(preds[0.0] - preds[1.0]).max() > 1e-2
    np.testing.assert_allclose(np.asarray(cell_tables[1.0].X), np.asarray(cell_tables[0.0].X), rtol=1e-5, atol=1e-5)


def test_bulk_models_do_not_retrieve_and_transfer_retrieves_from_its_own_bags(toy_tl):
    spots, cells = toy_tl
    bulk = bt.tl.pseudobulk(spots, block_size=2, method="kmeans")
    bulk_model = bt.tl.fit(bulk, target="bulk", cells=cells.copy(), **TINY)
    assert bulk_model.config.architecture.retrieval_weight == 0.0
    assert not hasattr(bulk_model.nets[0], "bank")
    to_spot = bt.tl.transfer(bulk_model, spots, "spot", cells=cells, epochs=1, validation=None)
    assert to_spot.config.architecture.retrieval_weight == 0.5
    assert to_spot.nets[0].bank.shape == (spots.n_obs, len(to_spot.config.genes))  # the fine-tuning spots
    spot_model = bt.tl.fit(spots, cells=cells, **TINY)
    to_bulk = bt.tl.transfer(spot_model, bulk, "bulk", cells=cells, epochs=1, validation=None)
    assert to_bulk.config.architecture.retrieval_weight == 0.0 and not hasattr(to_bulk.nets[0], "bank")


def test_a_bank_for_other_genes_is_refused():
    net = _net(0.5, n_genes=6)
    state = net.state_dict()
    state["bank"] = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="The retrieval bank holds 3 genes but the model predicts 6"):
        net.load_state_dict(state)
