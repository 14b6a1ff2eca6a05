"""BiTro's auxiliary target (``aux_key`` / ``aux_weight`` of ``bt.tl.fit``): a per-spot embedding predicted beside the genes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import bitro as bt

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = {"dim": 16, "heads": 2, "ff_dim": 32, "max_context": 16, "context_radius": 60.0, "batch_size": 8}
TINY.update(n_members=1, epochs=3, patience=3)
KEY = "X_latent"


def _with_aux(spots, cells, key: str = KEY):
    """Write each spot's cell-type fractions (what its cells' features show) to ``spots.obsm[key]``."""
    obs = cells.obs
    inside = obs["spot_id"].notna().to_numpy()
    frame = pd.DataFrame(
        {
            "spot": (obs["sample"].astype(str) + "_" + obs["spot_id"].astype(str)).to_numpy()[inside],
            "type": obs["phenotype"].astype(str).to_numpy()[inside],
        }
    )
    frac = pd.crosstab(frame["spot"], frame["type"], normalize="index")
    frac = frac.reindex(spots.obs_names.astype(str)).fillna(1 / 3)
    spots.obsm[key] = frac.to_numpy()
    return spots, cells


def test_aux_target_trains_and_predicts_genes(toy_tl):
    spots, cells = _with_aux(*toy_tl)
    model = bt.tl.fit(spots, cells=cells, aux_key=KEY, aux_weight=0.5, **TINY)
    arch = model.config.architecture
    assert arch.aux_dim == 3 and arch.aux_weight == 0.5
    assert model.config.training["aux_key"] == KEY
    assert "train_aux" in model.history[0] and len(model.history[0]["train_aux"]) == len(model.history[0]["train_loss"])
    assert dict(model.nets[0].named_parameters())["aux_head.weight"].shape == (3, 16)
    bt.tl.predict(model, spots, cells=cells, coverage="spots")
    pred = spots.obsm["bitro_predicted"]
    assert pred.shape == (spots.n_obs, spots.n_vars) and list(pred.columns) == list(model.config.genes)
    assert np.isfinite(pred.to_numpy()).all()


def test_aux_target_saves_and_loads(toy_tl, tmp_path):
    spots, cells = _with_aux(*toy_tl)
    model = bt.tl.fit(spots, cells=cells, aux_key=KEY, **TINY)
    bt.tl.predict(model, spots, cells=cells, coverage="spots")
    before = spots.obsm["bitro_predicted"].to_numpy().copy()
    model.save(tmp_path / "m")
    loaded = bt.tl.load_model(tmp_path / "m")
    assert loaded.config.architecture.aux_dim == 3 and loaded.config.architecture.aux_weight == 1.0
    assert torch.equal(loaded.nets[0].aux_head.weight, model.nets[0].aux_head.weight)
    del spots.obsm[KEY]  # prediction does not read the auxiliary target
    bt.tl.predict(loaded, spots, cells=cells, coverage="spots")
    np.testing.assert_allclose(spots.obsm["bitro_predicted"].to_numpy(), before, rtol=1e-5, atol=1e-5)


def test_without_aux_key_nothing_changes(toy_tl):
    spots, cells = toy_tl
    model = bt.tl.fit(spots, cells=cells, **TINY)
    assert model.config.architecture.aux_dim == 0
    assert not any(name.startswith("aux_") for name, _ in model.nets[0].named_parameters())
    assert "train_aux" not in model.history[0]


def test_aux_head_learns(toy_tl):
    """With weight 1 the auxiliary loss falls well below where it stays when the head gets no gradient (weight 0)."""
    spots, cells = _with_aux(*toy_tl)
    kw = {**TINY, "epochs": 25, "validation": None, "aux_key": KEY}
    learnt = bt.tl.fit(spots, cells=cells, aux_weight=1.0, **kw).history[0]["train_aux"]
    untrained = bt.tl.fit(spots, cells=cells, aux_weight=0.0, **kw).history[0]["train_aux"]
    assert learnt[-1] < 0.6 * learnt[0]
    assert learnt[-1] < 0.6 * untrained[-1]


def test_aux_prediction_correlates_with_the_target(toy_tl):
    from bitro.tl._bags import cell_data, collate, make_bags
    from bitro.tl._config import BagSettings

    spots, cells = _with_aux(*toy_tl)
    model = bt.tl.fit(spots, cells=cells, aux_key=KEY, validation=None, **{**TINY, "epochs": 25})
    net = model.nets[0].eval()
    data = cell_data(cells, use_rep="X_bitro", graph_key="spatial", phenotype_key="phenotype", need_phenotype=False)
    settings = BagSettings(context_radius=60.0, max_context=16)
    bags, keep = make_bags(spots, data, "spot", settings, for_what="train")
    with torch.no_grad():
        _, _, _, z = net._outputs(collate(bags, data))
        pred = net.aux_output(z).numpy()
    truth = spots.obsm[KEY][keep]
    r = [np.corrcoef(pred[:, j], truth[:, j])[0, 1] for j in range(truth.shape[1])]
    assert np.mean(r) > 0.5, r


@pytest.mark.parametrize(
    ("edit", "kw", "exc", "words"),
    [
        ("none", {"aux_key": "X_missing"}, KeyError, ("`.obsm['X_missing']`", "embed")),
        ("nan", {"aux_key": KEY}, ValueError, ("NaN or infinite", "1 of 48 rows")),
        ("cube", {"aux_key": KEY}, ValueError, ("shape (48, 2, 2)", "(48, k)")),
        ("empty", {"aux_key": KEY}, ValueError, ("shape (48, 0)", "(48, k)")),
        ("text", {"aux_key": KEY}, TypeError, ("not numeric",)),
        ("none", {"aux_key": 3}, TypeError, ("`aux_key`", "string")),
        ("none", {"aux_weight": 0.5}, ValueError, ("`aux_weight`", "aux_key")),
        ("none", {"aux_key": KEY, "aux_weight": -1.0}, ValueError, ("`aux_weight`", ">= 0")),
        ("none", {"aux_key": KEY, "aux_dim": 4}, TypeError, ("Unknown option", "aux_dim")),
        ("none", {"aux_key": KEY, "model": "m2ort"}, ValueError, ("model='m2ort'", "drop aux_key")),
        ("none", {"model": "m2ort", "aux_weight": 1.0}, TypeError, ("'aux_weight' is an option of model='bitro'",)),
    ],
)
def test_bad_aux_inputs_fail_before_training(toy_tl, monkeypatch, edit, kw, exc, words):
    import bitro.tl._train as train

    spots, cells = _with_aux(*toy_tl)
    if edit == "nan":
        spots.obsm[KEY][5, 1] = np.nan
    elif edit in ("cube", "empty", "text"):  # anndata checks the row count itself; these it lets through
        shapes = {"cube": (spots.n_obs, 2, 2), "empty": (spots.n_obs, 0), "text": (spots.n_obs, 2)}
        spots.obsm[KEY] = np.full(shapes[edit], "a", dtype=object) if edit == "text" else np.zeros(shapes[edit])
    monkeypatch.setattr(train, "train_ensemble", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(exc) as err:
        base = {"n_members": 1, "epochs": 1} if "model" in kw else TINY  # TINY's sizes are BiTro options
        bt.tl.fit(spots, cells=cells, **{**base, **kw})
    text = str(err.value.args[0]) if isinstance(err.value, KeyError) else str(err.value)
    for word in words:
        assert word in text, text
