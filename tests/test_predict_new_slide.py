"""Fit on some slides, save, and predict slides the model never saw: with and without spots, in a new process."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

import bitro as bt

pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = {"dim": 16, "heads": 2, "ff_dim": 32, "epochs": 3, "n_members": 2, "validation": None}


def _without_spots(sdata):
    """The slide as a user without spatial transcriptomics has it: the H&E image (and its truth, unused)."""
    del sdata.tables["spots"]
    for key in [k for k in sdata.shapes if k.endswith("_spots")]:
        del sdata.shapes[key]
    return sdata


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    bt.settings.progress = False
    train = bt.datasets.synthetic(2, size=1024, seed=0)
    bt.pp.segment_nuclei(train)
    cells = bt.pp.extract_cells(train)
    bt.pp.phenotypes(cells, n_clusters=4)
    bt.pp.spatial_graph(cells)
    model = bt.tl.fit(train, **TINY)
    folder = model.save(tmp_path_factory.mktemp("model") / "model")
    return train, model, folder


def _prepare(sdata, reference):
    bt.pp.segment_nuclei(sdata)
    cells = bt.pp.extract_cells(sdata, reference=reference)
    bt.pp.phenotypes(cells, reference=reference)
    bt.pp.spatial_graph(cells)
    return cells


def test_new_slide_without_spots_in_a_new_process(trained, tmp_path):
    """fit -> save -> (new process) load -> new H&E slide: segment, reference features and phenotypes, graph, predict."""
    from spatialdata.models import TableModel

    _, model, folder = trained
    new = _without_spots(bt.datasets.synthetic(1, size=1024, seed=7))
    bt.io.write_zarr(new, tmp_path / "new.zarr")
    script = f"""
import spatialdata as sd
import bitro as bt
bt.settings.progress = False
model = bt.tl.load_model({str(folder)!r})
sdata = sd.read_zarr({str(tmp_path / "new.zarr")!r})
bt.pp.segment_nuclei(sdata)
cells = bt.pp.extract_cells(sdata, reference=model)
bt.pp.phenotypes(cells, reference=model)
bt.pp.spatial_graph(cells)
expr = bt.tl.predict(model, sdata)
expr.write_h5ad({str(tmp_path / "expr.h5ad")!r})
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    import anndata as ad

    other = ad.read_h5ad(tmp_path / "expr.h5ad")
    # the same steps in this process, with the model in memory, give the same numbers
    cells = _prepare(new, model)
    expr = bt.tl.predict(model, new)
    np.testing.assert_allclose(other.X, expr.X, rtol=1e-5, atol=1e-6)
    # every cell of the slide is predicted, on the model's genes, finite
    assert expr.n_obs == cells.n_obs > 500 and list(expr.var_names) == model.genes
    assert np.isfinite(expr.X).all() and (expr.obs["n_bags"] >= 1).all()
    assert set(expr.obs["phenotype"].cat.categories) <= {"0", "1", "2", "3"}
    # virtual spots of the training spot size cover the tissue, as a valid table annotating their circles
    spots = new.tables["bitro_spots"]
    TableModel().validate(spots)
    TableModel().validate(new.tables["bitro_cells"])
    circles = new.shapes["synth0_virtual_spots"]
    assert len(circles) == spots.n_obs and set(spots.obs["spot_id"]) == set(circles.index)
    np.testing.assert_allclose(circles["radius"] * 0.5, model.config.bags.spot_radius)  # 0.5 um/px
    assert spots.uns["bitro"]["predict"]["X"]["coverage"] == "tissue"
    assert bt.io.get_sections(new)[0].spots_key is None  # virtual spots are never taken for measured ones
    # the mean over a virtual spot's cells of its own share is its prediction: the slide's cell mean is close
    np.testing.assert_allclose(expr.X.mean(0), spots.X.mean(0), rtol=0.15, atol=0.05)
    # the whole SpatialData, with the prediction tables, survives a zarr round trip
    bt.io.write_zarr(new, tmp_path / "predicted.zarr")


def test_training_slides_after_a_zarr_round_trip(trained, tmp_path):
    """The extraction record read back from zarr (arrays, numpy scalars) still matches the model's fingerprint."""
    import spatialdata as sd

    train, model, _ = trained
    bt.io.write_zarr(train, tmp_path / "train.zarr")
    back = sd.read_zarr(tmp_path / "train.zarr")
    with np.printoptions(precision=2, threshold=5):  # printing options must not change the outcome
        expr = bt.tl.predict(model, back)
    first = bt.tl.predict(model, train)
    np.testing.assert_allclose(expr.X, first.X, rtol=1e-5, atol=1e-6)
    pred = back.tables["spots"].obsm["bitro_predicted"]
    assert np.isfinite(pred.to_numpy()).all() and back.tables["bitro_spots"].n_obs == back.tables["spots"].n_obs


def test_features_made_differently_give_one_readable_line(trained):
    _, model, _ = trained
    new = _without_spots(bt.datasets.synthetic(1, size=512, seed=3))
    bt.pp.segment_nuclei(new)
    bt.pp.extract_cells(new, crop_um=12.0)  # no reference: other crops and a PCA of its own
    bt.pp.spatial_graph(new.tables["cells"])
    with pytest.raises(ValueError, match=r"crop_um is 12\.0 for these cells but 24\.0 for the model") as err:
        bt.tl.predict(model, new)
    message = str(err.value)
    assert "\n" not in message and len(message) < 300 and "reference=model" in message
    assert "bitro_cells" not in new.tables  # nothing written
    bt.pp.extract_cells(new)  # same settings, but a PCA fitted on these cells
    bt.pp.spatial_graph(new.tables["cells"])
    with pytest.raises(ValueError, match=r"scaler \+ PCA .* fitted on other cells"):
        bt.tl.predict(model, new)


def test_a_2x_downsampled_image_gives_close_predictions(trained):
    """Crops follow micrometres: the same slide scanned at half the resolution gives close cell predictions."""
    import shapely
    from spatialdata import SpatialData

    from bitro._utils import scale0
    from bitro.io._build import image_element, polygons_element

    _, model, _ = trained
    full = bt.datasets.synthetic(1, size=1024, seed=7)
    nuclei = full.shapes["synth0_true_nuclei"]
    image = scale0(full.images["synth0_image"]).values
    half_image = image.reshape(3, 512, 2, 512, 2).mean((2, 4)).round().astype(np.uint8)
    half_nuclei = [shapely.affinity.scale(g, 0.5, 0.5, origin=(0, 0)) for g in nuclei.geometry.values]
    half = SpatialData(
        images={"synth0_image": image_element(half_image, "synth0", 1.0)},
        shapes={"synth0_true_nuclei": polygons_element(half_nuclei, nuclei.index, "synth0", 1.0)},
    )
    preds = []
    for sdata in (full, half):
        cells = bt.pp.extract_cells(sdata, shapes_key="synth0_true_nuclei", reference=model)
        bt.pp.spatial_graph(cells)
        preds.append(bt.tl.predict(model, cells).X)
    a, b = preds
    r = np.nanmean([np.corrcoef(a[:, g], b[:, g])[0, 1] for g in range(a.shape[1])])
    assert r > 0.6, r  # measured 0.81
    assert np.abs(a - b).mean() / np.abs(a).mean() < 0.25  # measured 0.13


def test_slide_without_tissue(trained):
    from spatialdata import SpatialData

    from bitro.io._build import image_element

    _, model, _ = trained
    blank = SpatialData(images={"empty_image": image_element(np.full((3, 512, 512), 245, np.uint8), "empty", 0.5)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bt.pp.segment_nuclei(blank)
        cells = bt.pp.extract_cells(blank, reference=model)
    assert cells.n_obs == 0
    with pytest.warns(UserWarning, match="no tissue"):
        expr = bt.tl.predict(model, cells)
    assert expr.shape == (0, len(model.genes))


def test_scanpy_and_squidpy_on_the_predictions(trained):
    """Unchanged scanpy / squidpy calls work on the cell expression table and on the spot predictions."""
    import matplotlib.pyplot as plt
    import scanpy as sc
    import squidpy as sq

    train, model, _ = trained
    expr = bt.tl.predict(model, train)
    genes = model.genes[:5]
    sc.tl.rank_genes_groups(expr, "phenotype", method="t-test")
    assert set(expr.uns["rank_genes_groups"]["names"].dtype.names) == set(expr.obs["phenotype"].cat.categories)
    for table in (expr, train.tables["bitro_spots"]):
        sq.gr.spatial_neighbors(table, coord_type="generic", n_neighs=6, library_key="sample")
        sq.gr.spatial_autocorr(table, mode="moran", genes=genes, n_perms=None)
        assert np.isfinite(table.uns["moranI"]["I"].to_numpy()).all()
        sq.pl.spatial_scatter(table, shape=None, color=genes[0], library_key="sample", size=2)
        plt.close("all")


def test_a_model_whose_encoder_needs_weights(trained, monkeypatch):
    """A reference made with weights that are not given: refused before any crop is read."""
    import copy

    import bitro.pp._cells as cells_module

    _, model, _ = trained
    other = copy.copy(model)
    other.cell_reference = copy.deepcopy(model.cell_reference)
    other.cell_reference["extract_cells"].update(encoder="timm:resnet18", weights_sha256="ab" * 32)
    new = _without_spots(bt.datasets.synthetic(1, size=512, seed=3))
    bt.pp.segment_nuclei(new)

    def no_work(*args, **kwargs):
        raise AssertionError("crops were read before the check")

    monkeypatch.setattr(cells_module, "_extract_section", no_work)
    with pytest.raises(ValueError, match=r"timm:resnet18.*needs `weights=`"):
        bt.pp.extract_cells(new, reference=other)
    assert "cells" not in new.tables


def test_spot_table_without_cells_is_refused(trained):
    train, model, _ = trained
    spots = train.tables["spots"].copy()
    spots.obsm.pop("bitro_predicted", None)  # from the other tests of this module
    with pytest.raises(ValueError, match="pass the cell table as `cells=`"):
        bt.tl.predict(model, spots)
    assert "bitro_predicted" not in spots.obsm


def test_slide_whose_stains_cannot_be_fitted_is_predicted_unnormalised(caplog):
    """A slide on which no stain vectors can be fitted (grey tissue): a warning, and the original image is used."""
    from spatialdata import SpatialData

    from bitro._pipeline import normalize_to_model
    from bitro._utils import scale0
    from bitro.io._build import image_element

    model = bt.tl.load_model("her2st")  # records a stain reference
    synth = bt.datasets.synthetic(1, size=256, seed=3)
    rgb = scale0(synth.images["synth0_image"]).values
    grey = np.broadcast_to(rgb.mean(axis=0, keepdims=True), rgb.shape).astype(np.uint8)
    sdata = SpatialData(images={"grey_image": image_element(grey, "grey", 0.5, scale_factors=[2])})
    with caplog.at_level("WARNING", logger="bitro"):
        keys = normalize_to_model(sdata, model, {"grey": "grey_image"})
    assert keys == {"grey": "grey_image"}
    assert "predicted without stain normalisation" in caplog.text and "grey_image_normalized" not in sdata.images
    # a slide whose stains can be fitted is normalised
    sdata.images["synth0_image"] = synth.images["synth0_image"]
    assert normalize_to_model(sdata, model, {"synth0": "synth0_image"}) == {"synth0": "synth0_image_normalized"}
