"""M2ORT and CMRCNet through bitro's one API: spot patches -> fit -> save -> load (fresh process) -> predict."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import bitro as bt

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

#: CPU-tiny versions of the two predictors (the defaults are the CPU variants of SEED_SYSTEMS.md; smaller here).
OPTIONS = {
    "m2ort": {"dim": 48, "depth": 1, "heads": 2, "dim_head": 8, "mlp_dim": 48},
    "cmrcnet": {"token_dim": 32, "projection_dim": 32, "encoder_depth": 1, "encoder_heads": 2, "k": 5},
}
TRAIN = {"epochs": 4, "n_members": 1, "batch_size": 8}
PATCHES = {"size_um": 48.0, "patch_px": 56, "grid": 7, "scales": 3}


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Two synthetic cohorts: one to train on, a new slide the models never saw; their patch tables."""
    before, bt.settings.cache_dir = bt.settings.cache_dir, tmp_path_factory.mktemp("cache")
    train = bt.datasets.synthetic(n_samples=3, size=768, seed=0)
    new = bt.datasets.synthetic(n_samples=1, size=768, seed=5)
    for sdata in (train, new):
        bt.pp.spot_patches(sdata, **PATCHES)
    yield train, new
    bt.settings.cache_dir = before


@pytest.mark.parametrize("name", ["m2ort", "cmrcnet"])
def test_fit_save_load_predict_new_slide(slides, name, tmp_path):
    train, new = slides
    model = bt.tl.fit(train, model=name, **TRAIN, **OPTIONS[name])  # no `cells=`: the patch table is the input
    assert model.config.model == name and model.config.bags.context_radius == 0
    assert model.config.training["cells_key"] == "patches" and model.config.feature_key == "bitro_patches"
    out = bt.tl.predict(model, new)
    spots = new["spots"]
    assert out.shape == (spots.n_obs, len(model.genes)) and np.isfinite(out.X).all() and (out.X >= 0).all()
    assert new.tables["bitro_spots"] is out
    assert (spots.obs["predicted_from"] == "patch").all()
    assert np.array_equal(spots.obsm["bitro_predicted"].to_numpy(), out.X)
    assert spots.uns["bitro"]["predict"]["bitro_predicted"]["n_spots"] == spots.n_obs
    scores = bt.tl.evaluate(spots, layer="bitro_predicted")
    assert np.isfinite(scores["pcc_overall"]).all()

    # a fresh process loads the saved model and predicts the same values
    model.save(tmp_path / "model")
    new.write(tmp_path / "new.zarr")
    script = f"""
import json, numpy as np, bitro as bt
bt.settings.progress = False
import spatialdata as sd
sdata = sd.read_zarr({str(tmp_path / "new.zarr")!r})
model = bt.tl.load_model({str(tmp_path / "model")!r})
out = bt.tl.predict(model, sdata, key_added="again")
print(json.dumps(np.asarray(out.X, dtype=float).tolist()))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    again = np.array(json.loads(run.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(again, out.X, rtol=1e-5, atol=1e-5)


def test_cmrcnet_bank_is_saved_with_the_model(slides, tmp_path):
    train, _ = slides
    model = bt.tl.fit(train, model="cmrcnet", **TRAIN, **OPTIONS["cmrcnet"])
    n_train = len(model.config.training_samples)
    bank = model.nets[0].bank
    assert bank.shape[1] == len(model.genes) and bank.shape[0] > 0 and n_train >= 2
    model.save(tmp_path / "m")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "m" / "weights.safetensors"))
    assert torch.equal(saved["0.bank"], bank)
    loaded = bt.tl.load_model(tmp_path / "m")
    assert torch.equal(loaded.nets[0].bank, bank)


def test_cross_validate_a_patch_model(slides):
    train, _ = slides
    scores = bt.tl.cross_validate(train, model="m2ort", folds=["synth0"], **TRAIN, **OPTIONS["m2ort"])
    assert set(scores["method"]) >= {"m2ort", "mean", "ridge"}
    assert np.isfinite(scores.loc[scores["method"] == "m2ort", "pcc_overall"]).all()


def test_patch_models_refuse_what_they_cannot_do(slides):
    train, _ = slides
    spots = train["spots"]
    with pytest.raises(ValueError, match="is not a registered model; use one of .*'bitro', 'cmrcnet', 'm2ort'"):
        bt.tl.fit(train, model="hist2st")
    with pytest.raises(TypeError, match=r"'gene_rank' is an option of model='bitro'"):
        bt.tl.fit(train, model="m2ort", gene_rank=10)
    with pytest.raises(TypeError, match=r"'qkv' is an option of model='m2ort'"):
        bt.tl.fit(train, model="bitro", qkv="per_level")
    with pytest.raises(ValueError, match="train it with target='spot'"):
        bt.tl.fit(train, "bulk", model="m2ort")
    with pytest.raises(ValueError, match="'patches'"):  # an AnnData needs its patch table, not cells
        bt.tl.fit(spots, model="m2ort")
    no_layout = train["patches"].copy()
    del no_layout.uns["bitro"]["extract_cells"]["patch_layout"]
    with pytest.raises(ValueError, match="reads spot patches"):  # e.g. a cell table
        bt.tl.fit(spots, model="cmrcnet", cells=no_layout)
    with pytest.raises(ValueError, match="refit_features=True refits cell features"):
        bt.tl.cross_validate(train, model="m2ort", refit_features=True)
    assert "bitro_predicted" not in spots.obsm


def test_new_slide_patches_must_match_the_model(slides):
    train, new = slides
    model = bt.tl.fit(train, model="m2ort", **TRAIN, **OPTIONS["m2ort"])
    other = bt.pp.spot_patches(new, **{**PATCHES, "fov": "growing"}, key_added="growing")
    with pytest.raises(ValueError, match="do not match the model's.*patch_layout"):
        bt.tl.predict(model, new["spots"], cells=other)


def test_command_line_fit_and_predict_a_new_store(slides, tmp_path, capsys, her2st_dir):
    """`bitro fit --predictor m2ort` then `bitro predict` on a store the model never saw, patches cut on the way."""
    import spatialdata as sd

    from bitro._cli import main

    train, new = slides
    train.write(tmp_path / "train.zarr")
    fresh = sd.SpatialData(images=dict(new.images), shapes=dict(new.shapes), tables={"spots": new["spots"].copy()})
    fresh.write(tmp_path / "new.zarr")  # no patch table: predict cuts it as the model's training patches were
    opts = ["--predictor", "m2ort", "--epochs", "2"]
    main(["fit", str(tmp_path / "train.zarr"), "--model", str(tmp_path / "m"), *opts])
    model = bt.tl.load_model(tmp_path / "m")
    assert model.config.model == "m2ort" and model.config.features["patch_layout"]["patch_px"] == PATCHES["patch_px"]
    main(["predict", str(tmp_path / "new.zarr"), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "pred.zarr")])
    assert f"for {new['spots'].n_obs} spots" in capsys.readouterr().out
    pred = sd.read_zarr(tmp_path / "pred.zarr")
    assert pred["bitro_spots"].shape == (new["spots"].n_obs, len(model.genes))
    assert pred["patches"].uns["bitro"]["spot_patches"]["patch_px"] == PATCHES["patch_px"]
    with pytest.raises(SystemExit):  # an image file: a patch model needs spots to cut around
        image = str(her2st_dir / "C3.jpg")
        main(["predict", image, "--model", str(tmp_path / "m"), "--pixel-size", "0.6878", "--out", str(tmp_path / "x")])
    assert "predicts spots from their image patches" in capsys.readouterr().err  # checked after the arguments
