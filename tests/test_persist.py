from __future__ import annotations

import json

import numpy as np
import pytest

import bitro as bt

pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture
def trained(toy_tl):
    spots, cells = toy_tl
    model = bt.tl.fit(
        spots, cells=cells, dim=16, heads=2, ff_dim=32, max_context=16, context_radius=60.0, epochs=2, n_members=2
    )
    return model, spots, cells


def test_save_load_same_predictions(trained, tmp_path):
    model, spots, cells = trained
    expr = bt.tl.predict(model, spots, cells=cells)
    before = spots.obsm["bitro_predicted"].to_numpy().copy()
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "reference.safetensors",
        "weights.safetensors",
    ]
    loaded = bt.tl.load_model(tmp_path / "m")
    assert loaded.genes == model.genes and len(loaded.nets) == 2
    assert loaded.history[0]["train_loss"] == model.history[0]["train_loss"]
    again = bt.tl.predict(loaded, spots, cells=cells)
    np.testing.assert_array_equal(spots.obsm["bitro_predicted"].to_numpy(), before)
    np.testing.assert_array_equal(again.X, expr.X)
    assert "n_genes=12" in repr(loaded)
    # the model carries its training cells' scaler + PCA and phenotype centroids, bit for bit
    for name in ("scaler_mean", "scaler_scale", "pca_mean", "pca_components"):
        np.testing.assert_array_equal(
            loaded.cell_reference["extract_cells"]["reducer"][name], cells.uns["bitro"]["extract_cells"]["reducer"][name]
        )
    assert loaded.config.features["fingerprint"] == cells.uns["bitro"]["extract_cells"]["fingerprint"]


def test_truncated_or_corrupted_files(trained, tmp_path):
    model, _, _ = trained
    folder = model.save(tmp_path / "m")
    weights = folder / "weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        bt.tl.load_model(folder)
    weights.write_bytes(data)
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config[: len(config) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        bt.tl.load_model(folder)
    (folder / "config.json").write_text(json.dumps({"format_version": 2}))
    with pytest.raises(ValueError, match="lacks"):
        bt.tl.load_model(folder)
    (folder / "config.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(ValueError, match="older bitro"):
        bt.tl.load_model(folder)
    with pytest.raises(FileNotFoundError, match="no folder"):
        bt.tl.load_model(tmp_path / "nothing")


def test_weights_not_matching_config(trained, tmp_path):
    model, _, _ = trained
    folder = model.save(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["architecture"]["dim"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="changed after the model was saved"):  # the checksum sees the edit
        bt.tl.load_model(folder)
    del config["checksums"]  # a model saved without checksums: the weights themselves disagree
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match"):
        bt.tl.load_model(folder)


def test_predict_checks_features(trained):
    model, spots, cells = trained
    other = cells.copy()
    other.obsm["X_bitro"] = other.obsm["X_bitro"][:, :5]
    with pytest.raises(ValueError, match="8-dimensional"):
        bt.tl.predict(model, spots, cells=other)
    other = cells.copy()
    record = dict(other.uns["bitro"]["extract_cells"], crop_um=12.0)
    other.uns["bitro"] = {**other.uns["bitro"], "extract_cells": record}
    with pytest.raises(ValueError, match="crop_um is 12.0 for these cells but 24.0 for the model") as err:
        bt.tl.predict(model, spots, cells=other)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400  # one readable line
    other.uns["bitro"]["extract_cells"] = dict(cells.uns["bitro"]["extract_cells"], reducer={
        k: np.asarray(v) * 1.01 for k, v in cells.uns["bitro"]["extract_cells"]["reducer"].items()
    })
    with pytest.raises(ValueError, match="scaler \\+ PCA"):
        bt.tl.predict(model, spots, cells=other)
    del other.uns["bitro"]["extract_cells"]
    with pytest.raises(ValueError, match="no extraction record"):
        bt.tl.predict(model, spots, cells=other)
    assert "bitro_predicted" not in spots.obsm
