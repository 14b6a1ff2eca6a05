"""BiTro's fields of cells (``field_radii`` of ``bt.tl.fit``; on by default for spot models): one token per radius, the
mean features of the cells within it around each spot, measured or virtual, beside the cell tokens in the Transformer."""

from __future__ import annotations

import numpy as np
import pytest

import bitro as bt

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = {"dim": 16, "heads": 2, "ff_dim": 32, "max_context": 16, "context_radius": 60.0, "batch_size": 8}
TINY.update(n_members=1, epochs=3, patience=3)


@pytest.fixture(scope="module")
def fitted(_toy_tl_cache):
    """A spot model with the default fields, fitted once for the module, and its tables."""
    torch.set_num_threads(1)
    spots, cells = _toy_tl_cache[0].copy(), _toy_tl_cache[1].copy()
    return bt.tl.fit(spots, cells=cells, seed=0, **TINY), spots, cells


def _brute_force(spots, cells, radii):
    """The fields of every spot, one cell at a time."""
    px = cells.uns["bitro"]["pixel_size"]
    x = np.asarray(cells.obsm["X_bitro"], dtype=np.float64)
    out = []
    for sample, centre in zip(spots.obs["sample"].astype(str), np.asarray(spots.obsm["spatial"]), strict=True):
        mine = (cells.obs["sample"].astype(str) == sample).to_numpy()
        d = np.linalg.norm((np.asarray(cells.obsm["spatial"])[mine] - centre) * px[sample], axis=1)
        out.append(np.concatenate([x[mine][d <= r].mean(0) if (d <= r).any() else np.zeros(x.shape[1]) for r in radii]))
    return np.array(out)


def test_field_embeddings_are_the_mean_features_within_each_radius(toy_tl):
    from bitro.tl._bags import cell_data, field_embeddings

    spots, cells = toy_tl
    radii = (10.0, 40.0, 150.0)
    got = field_embeddings(spots, cell_data(cells), radii)
    assert got.shape == (spots.n_obs, 3 * cells.obsm["X_bitro"].shape[1]) and got.dtype == np.float32
    np.testing.assert_allclose(got, _brute_force(spots, cells, radii), rtol=1e-4, atol=1e-5)
    # a field without a cell is the features' centre, zeros; one spot's fields do not depend on the other rows
    far = spots[:2].copy()
    far.obsm["spatial"] = np.array([[5000.0, 5000.0], np.asarray(spots.obsm["spatial"])[1]])
    alone = field_embeddings(far, cell_data(cells), radii)
    assert not alone[0].any()
    np.testing.assert_allclose(alone[1], got[1], rtol=1e-5)


def test_spot_models_read_the_default_fields(fitted):
    from bitro.tl.models._bitro import DEFAULT_FIELD_RADII

    model, spots, cells = fitted
    arch, net = model.config.architecture, model.nets[0]
    n_feat = cells.obsm["X_bitro"].shape[1]
    assert arch.field_radii == DEFAULT_FIELD_RADII
    assert (arch.patch_dim, arch.patch_scales) == (len(DEFAULT_FIELD_RADII) * n_feat, len(DEFAULT_FIELD_RADII))
    assert model.config.patch_key is None
    train = _brute_force(spots, cells, DEFAULT_FIELD_RADII)  # every toy spot has cells: all rows trained
    np.testing.assert_allclose(net.patch_mean.numpy(), train.mean(0), rtol=1e-4, atol=1e-5)
    # the fields change what the network predicts: shuffled fields, another prediction
    s = spots.copy()
    bt.tl.predict(model, s, cells=cells, coverage="spots")
    base = s.obsm["bitro_predicted"].to_numpy()
    assert np.isfinite(base).all()
    with torch.no_grad():
        net.patch_mean.add_(5.0)
    try:
        s2 = spots.copy()
        bt.tl.predict(model, s2, cells=cells, coverage="spots")
        assert not np.allclose(s2.obsm["bitro_predicted"].to_numpy(), base)
    finally:
        with torch.no_grad():
            net.patch_mean.sub_(5.0)


def test_virtual_spots_and_slides_without_spots_get_their_fields(fitted):
    """A spot model with fields predicts every cell of a slide that has no spots (the fields come from its cells)."""
    model, spots, cells = fitted
    one = cells[cells.obs["sample"].astype(str) == "S1"].copy()
    one.obs = one.obs.drop(columns="spot_id")  # a slide without spots
    expr = bt.tl.predict(model, one)
    assert expr.n_obs == one.n_obs and np.isfinite(np.asarray(expr.X)).all()
    # a section's spots predicted alone or among all: the same (a spot's fields and bag depend on it alone)
    s_all = spots.copy()
    mine = (spots.obs["sample"].astype(str) == "S0").to_numpy()
    s_one = spots[mine].copy()
    bt.tl.predict(model, s_all, cells=cells, coverage="spots")
    bt.tl.predict(model, s_one, cells=cells[(cells.obs["sample"].astype(str) == "S0").to_numpy()].copy(), coverage="spots")
    got, want = s_one.obsm["bitro_predicted"].to_numpy(), s_all.obsm["bitro_predicted"].to_numpy()[mine]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_save_load_round_trip(fitted, tmp_path):
    model, spots, cells = fitted
    model.save(tmp_path / "m")
    loaded = bt.tl.load_model(tmp_path / "m")
    assert loaded.config.architecture.field_radii == model.config.architecture.field_radii
    a, b = spots.copy(), spots.copy()
    bt.tl.predict(model, a, cells=cells, coverage="spots")
    bt.tl.predict(loaded, b, cells=cells, coverage="spots")
    np.testing.assert_allclose(a.obsm["bitro_predicted"].to_numpy(), b.obsm["bitro_predicted"].to_numpy(), rtol=1e-6)


def test_a_config_saved_before_fields_loads_without_them():
    from bitro.tl.models._bitro import BitroArchitecture, BitroNet

    arch = BitroArchitecture.for_data(n_features=8, n_genes=12, bag_sizes=[1.0, 2.0], field_radii=())
    old = {k: v for k, v in arch.to_dict().items() if k != "field_radii"}
    loaded = BitroArchitecture.from_dict(old)
    assert loaded.field_radii == () and not any("patch" in name for name in BitroNet(loaded).state_dict())


def test_bulk_models_and_models_without_a_transformer_have_no_fields(toy_tl):
    spots, cells = toy_tl
    bulk = bt.tl.pseudobulk(spots, method="kmeans")
    model = bt.tl.fit(bulk, target="bulk", cells=cells, validation=None, **{**TINY, "epochs": 1})
    assert model.config.architecture.field_radii == () and model.config.architecture.patch_dim == 0
    flat = bt.tl.fit(spots, cells=cells, transformer_layers=0, **{**TINY, "epochs": 1})
    assert flat.config.architecture.field_radii == () and flat.config.architecture.patch_dim == 0
    own = bt.tl.fit(spots, cells=cells, field_radii=[50, 100], **{**TINY, "epochs": 1})
    assert own.config.architecture.field_radii == (50.0, 100.0) and own.config.architecture.patch_scales == 2


def test_transfer_to_bulk_leaves_the_fields_out_and_back_to_spots_reads_them(fitted):
    model, spots, cells = fitted
    bulk = bt.tl.pseudobulk(spots, method="kmeans")
    to_bulk = bt.tl.transfer(model, bulk, target="bulk", cells=cells, epochs=1, validation=None)
    b = bulk.copy()
    bt.tl.predict(to_bulk, b, cells=cells)
    assert np.isfinite(b.obsm["bitro_predicted"].to_numpy()).all()
    again = bt.tl.transfer(model, spots, target="spot", cells=cells, epochs=1, validation=None)
    s = spots.copy()
    bt.tl.predict(again, s, cells=cells, coverage="spots")
    assert np.isfinite(s.obsm["bitro_predicted"].to_numpy()).all()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"field_radii": [-5.0]}, "distinct positive radii"),
        ({"field_radii": [50.0, 50.0]}, "distinct positive radii"),
        ({"field_radii": "75"}, "distinct positive radii"),
        ({"field_radii": [75.0], "transformer_layers": 0}, "Transformer, which is off"),
        ({"field_radii": [75.0], "patch_key": "X_patch"}, "cannot be combined"),
    ],
)
def test_bad_field_options_fail_before_training(toy_tl, options, match):
    spots, cells = toy_tl
    spots.obsm["X_patch"] = np.ones((spots.n_obs, 3))
    before = spots.copy()
    with pytest.raises(ValueError, match=match):
        bt.tl.fit(spots, cells=cells, **{**TINY, **options})
    assert list(spots.obsm) == list(before.obsm) and spots.obs.equals(before.obs)


def test_bulk_refuses_explicit_fields(toy_tl):
    spots, cells = toy_tl
    with pytest.raises(ValueError, match="bulk model's bags have no centre"):
        bt.tl.fit(bt.tl.pseudobulk(spots, method="kmeans"), target="bulk", cells=cells, field_radii=[75.0], **TINY)
