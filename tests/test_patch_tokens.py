"""BiTro's multi-scale patch tokens (``patch_key`` / ``patch_scales`` of ``bt.tl.fit``): a per-spot image embedding cut
into one token per scale, beside the cell tokens in the Transformer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import bitro as bt

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = {"dim": 16, "heads": 2, "ff_dim": 32, "max_context": 16, "context_radius": 60.0, "batch_size": 8}
TINY.update(n_members=1, epochs=3, patience=3)
KEY = "X_patch"
SCALES, WIDTH = 3, 12


def _with_patches(spots, cells, key: str = KEY, width: int = WIDTH):
    """Give every spot an embedding (``width`` numbers) that tells its cells' types apart, off the unit scale."""
    rng = np.random.default_rng(1)
    types = cells.obs["phenotype"].astype(str).to_numpy()
    inside = cells.obs["spot_id"].notna().to_numpy()
    spot = (cells.obs["sample"].astype(str) + "_" + cells.obs["spot_id"].astype(str)).to_numpy()
    frac = np.zeros((spots.n_obs, 3))
    row = {name: i for i, name in enumerate(spots.obs_names.astype(str))}
    for s, t in zip(spot[inside], types[inside], strict=True):
        frac[row[s], int(t)] += 1
    frac /= np.maximum(frac.sum(1, keepdims=True), 1)
    mix = rng.normal(size=(3, width))
    spots.obsm[key] = 10 + 5 * frac @ mix + rng.normal(0, 0.1, size=(spots.n_obs, width))
    return spots, cells


@pytest.fixture(scope="module")
def fitted(_toy_tl_cache):
    """A model with patch tokens fitted on the toy spots (fitted once for the module) and its tables."""
    torch.set_num_threads(1)
    spots, cells = _with_patches(_toy_tl_cache[0].copy(), _toy_tl_cache[1].copy())
    model = bt.tl.fit(spots, cells=cells, patch_key=KEY, patch_scales=SCALES, seed=0, **TINY)
    return model, spots, cells


def test_fit_records_the_tokens_and_predicts(fitted):
    model, spots, cells = fitted
    arch, net = model.config.architecture, model.nets[0]
    assert (arch.patch_dim, arch.patch_scales) == (WIDTH, SCALES)
    assert model.config.patch_key == KEY and model.config.to_dict()["patch_key"] == KEY
    params = dict(net.named_parameters())
    assert [params[f"patch_proj.{j}.weight"].shape for j in range(SCALES)] == [(16, WIDTH // SCALES)] * SCALES
    train = np.asarray(spots.obsm[KEY])  # every toy spot has cells, so all rows trained
    np.testing.assert_allclose(net.patch_mean.numpy(), train.mean(0), rtol=1e-5)
    np.testing.assert_allclose(net.patch_std.numpy(), train.std(0), rtol=1e-4)
    s = spots.copy()
    expr = bt.tl.predict(model, s, cells=cells)  # coverage="tissue" asked: the measured spots' cells
    pred = s.obsm["bitro_predicted"]
    assert pred.shape == (spots.n_obs, len(model.genes)) and np.isfinite(pred.to_numpy()).all()
    assert expr.n_vars == len(model.genes) and expr.n_obs > 0 and np.isfinite(np.asarray(expr.X)).all()
    assert s.uns["bitro"]["predict"]["bitro_predicted"]["coverage"] == "spots"


def test_the_option_off_leaves_the_network_as_it_was(toy_tl):
    from bitro.tl.models._bitro import BitroArchitecture, BitroNet

    arch = BitroArchitecture.for_data(n_features=8, n_genes=12, bag_sizes=[1.0, 2.0])
    assert (arch.patch_dim, arch.patch_scales) == (0, 0)
    old = {k: v for k, v in arch.to_dict().items() if k not in ("patch_dim", "patch_scales")}  # a config saved before
    torch.manual_seed(0)
    now = BitroNet(arch)
    torch.manual_seed(0)
    before = BitroNet(BitroArchitecture.from_dict(old))
    assert list(now.state_dict()) == list(before.state_dict())
    assert sum(p.numel() for p in now.parameters()) == sum(p.numel() for p in before.parameters())
    assert not any("patch" in name for name in now.state_dict())
    spots, cells = toy_tl
    model = bt.tl.fit(spots, cells=cells, field_radii=(), **TINY)  # and no fields of cells (on by default)
    assert model.config.patch_key is None and "patch_key" not in model.config.to_dict()
    assert model.config.architecture.patch_dim == 0
    assert not any("patch" in name for name in model.nets[0].state_dict())


def test_save_load_predict_round_trip(fitted, tmp_path):
    model, spots, cells = fitted
    before = spots.copy()
    bt.tl.predict(model, before, cells=cells, coverage="spots")
    model.save(tmp_path / "m")
    loaded = bt.tl.load_model(tmp_path / "m")
    assert loaded.config.patch_key == KEY and loaded.config.architecture == model.config.architecture
    assert torch.equal(loaded.nets[0].patch_std, model.nets[0].patch_std)
    after = spots.copy()
    bt.tl.predict(loaded, after, cells=cells, coverage="spots")
    np.testing.assert_array_equal(after.obsm["bitro_predicted"].to_numpy(), before.obsm["bitro_predicted"].to_numpy())


def test_a_spot_does_not_depend_on_its_batch_and_reads_its_own_patch(fitted):
    from bitro.tl._bags import cell_data, patch_embeddings, spot_bags

    model, spots, cells = fitted
    net = model.nets[0].eval()
    feats = cell_data(cells)
    emb = patch_embeddings(spots, KEY)
    bags = spot_bags(spots, feats, context_radius=60.0, max_context=16, patches=emb)
    together = net.predict_bags(bags, feats, tokens_per_batch=100_000)
    alone = np.stack([net.predict_bags([b], feats, tokens_per_batch=100_000)[0] for b in bags[:6]])
    np.testing.assert_allclose(together[:6], alone, rtol=1e-4, atol=1e-5)
    changed = emb.copy()
    changed[0] += 20.0
    moved = net.predict_bags(
        spot_bags(spots, feats, context_radius=60.0, max_context=16, patches=changed), feats, tokens_per_batch=100_000
    )
    assert np.abs(moved[0] - together[0]).max() > 1e-4  # the spot's own patch matters ...
    np.testing.assert_allclose(moved[1:], together[1:], rtol=1e-4, atol=1e-5)  # ... and no other spot's


def test_cell_dropout_keeps_the_patch(fitted):
    from bitro.tl._bags import cell_data, collate, patch_embeddings, spot_bags

    _, spots, cells = fitted
    feats = cell_data(cells)
    emb = patch_embeddings(spots, KEY)
    bags = spot_bags(spots, feats, context_radius=60.0, max_context=16, patches=emb)
    batch = collate(bags[:5], feats, rng=np.random.default_rng(0), cell_dropout=0.9)
    assert len(batch.x) < sum(len(b[0].cells) for b in bags[:5])
    np.testing.assert_allclose(batch.patch.numpy(), emb[:5])
    assert collate(spot_bags(spots, feats, context_radius=60.0, max_context=16)[:5], feats).patch is None


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        ("drop", ("lacks", "X_patch", "bt.pp.spot_patches", "efficientnet")),
        ("narrow", ("12-wide", "8 wide")),
        ("nan", ("NaN or infinite",)),
    ],
)
def test_predict_refuses_a_spot_table_without_the_embedding(fitted, monkeypatch, edit, words):
    import bitro.tl.models._base as base

    model, spots, cells = fitted
    s = spots.copy()
    if edit == "drop":
        del s.obsm[KEY]
    elif edit == "narrow":
        s.obsm[KEY] = np.asarray(s.obsm[KEY])[:, :8]
    else:
        s.obsm[KEY] = np.asarray(s.obsm[KEY]).copy()
        s.obsm[KEY][3, 2] = np.nan
    monkeypatch.setattr(base, "predict_ensemble", lambda *a, **k: pytest.fail("prediction started"))
    with pytest.raises(ValueError) as err:
        bt.tl.predict(model, s, cells=cells)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_slides_without_spots_and_transfer_are_refused(fitted):
    model, spots, cells = fitted
    with pytest.raises(ValueError, match="not slides without spots"):
        bt.tl.predict(model, cells.copy())
    with pytest.raises(ValueError, match="cannot be fine-tuned"):
        bt.tl.transfer(model, spots.copy(), "spot", cells=cells, epochs=1, validation=None)


def test_predict_slide_refuses_before_reading_the_slide(fitted, tmp_path):
    """A slide without spots has no patch embeddings: refused before the slide is read or segmented."""
    import tifffile

    model = fitted[0]
    slide = tmp_path / "slide.tif"
    tifffile.imwrite(slide, np.zeros((64, 64, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="without `patch_key`"):
        bt.predict_slide(slide, model, pixel_size=0.5)


@pytest.mark.parametrize(
    ("kw", "exc", "words"),
    [
        ({"patch_key": "X_missing"}, ValueError, ("lacks", "spot_patches")),
        ({"patch_key": KEY, "patch_scales": 5}, ValueError, ("`patch_scales` (5)", "12")),
        ({"patch_key": KEY, "transformer_layers": 0}, ValueError, ("transformer_layers",)),
        ({"patch_scales": 3}, ValueError, ("`patch_scales`", "patch_key")),
        ({"patch_key": KEY, "patch_dim": 4}, TypeError, ("Unknown option", "patch_dim")),
        ({"patch_key": 3}, TypeError, ("`patch_key`", "string")),
        ({"patch_key": KEY, "target": "bulk"}, ValueError, ("bulk", "drop patch_key")),
    ],
)
def test_bad_fit_inputs_fail_before_training(toy_tl, monkeypatch, kw, exc, words):
    import bitro.tl._train as train

    spots, cells = _with_patches(*toy_tl)
    monkeypatch.setattr(train, "train_ensemble", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(exc) as err:
        bt.tl.fit(spots, cells=cells, **{**TINY, **kw})
    for word in words:
        assert word in str(err.value), str(err.value)


def test_a_patch_model_refuses_the_option(toy_tl):
    spots, cells = _with_patches(*toy_tl)
    with pytest.raises(ValueError, match="model='m2ort'"):
        bt.tl.fit(spots, cells=cells, model="m2ort", patch_key=KEY, n_members=1, epochs=1)


def test_a_config_with_half_the_option_is_refused(fitted):
    from bitro._checks import ConfigError
    from bitro.tl._config import ModelConfig

    model, _, _ = fitted
    config = model.config.to_dict()
    with pytest.raises(ConfigError, match="set together"):
        ModelConfig.from_dict({k: v for k, v in config.items() if k != "patch_key"})
    arch = dataclasses.replace(model.config.architecture, patch_dim=0, patch_scales=0).to_dict()
    with pytest.raises(ConfigError, match="set together"):
        ModelConfig.from_dict({**config, "architecture": arch})


def test_cross_validate_and_evaluate_take_the_option(toy_tl):
    spots, cells = _with_patches(*toy_tl)
    kw = {**TINY, "epochs": 2}
    scores = bt.tl.cross_validate(
        spots, cells=cells, folds=["S0"], baselines=False, n_clusters=3, patch_key=KEY, patch_scales=SCALES, **kw
    )
    row = scores[(scores["held_out"] == "S0") & (scores["method"] == "bitro")].iloc[0]
    assert row["n_obs"] == 16 and np.isfinite(row["pcc_gene"])
