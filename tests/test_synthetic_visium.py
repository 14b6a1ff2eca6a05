"""bt.datasets.synthetic_visium: Space Ranger folders that spatialdata-io reads back as written."""

from __future__ import annotations

import json

import numpy as np
import pytest

import bitro as bt


def test_synthetic_visium_reads_back_with_spatialdata_io(tmp_path):
    spatialdata_io = pytest.importorskip("spatialdata_io")
    synth = bt.datasets.synthetic_visium(tmp_path, 2, size=512, seed=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth0", "synth1"]
    folder = tmp_path / "synth1"
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert names == [
        "filtered_feature_bc_matrix.h5",
        "spatial/scalefactors_json.json",
        "spatial/tissue_hires_image.png",
        "spatial/tissue_lowres_image.png",
        "spatial/tissue_positions.csv",
        "synth1_full_image.tif",
        "synth1_nuclei.geojson",
    ]
    sdata = spatialdata_io.visium(folder, dataset_id="synth1", fullres_image_file="synth1_full_image.tif")
    table = sdata["table"]
    truth = synth["spots"][(synth["spots"].obs["sample"] == "synth1").to_numpy()]
    assert list(table.var_names) == list(truth.var_names)
    expected = truth.X.toarray() if hasattr(truth.X, "toarray") else np.asarray(truth.X)
    np.testing.assert_array_equal(table.X.toarray(), expected)
    image = sdata["synth1_full_image"]
    full = image["scale0"].image if hasattr(image, "children") else image
    assert full.shape == (3, 512, 512)
    scalef = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
    radius = float(synth["synth1_spots"]["radius"].iloc[0])
    assert scalef["spot_diameter_fullres"] == pytest.approx(2 * radius)
    # the pixel size measured from the spots is the generator's 0.5 µm
    px = bt.io.set_pixel_size(sdata, "synth1_full_image", spot_diameter_um=55.0, spots_key="synth1")
    assert px == pytest.approx(0.5, rel=0.02)
    # the nuclei load as the section's cells, one per true nucleus
    bt.pp.load_segmentation(sdata, folder / "synth1_nuclei.geojson", format="geojson", image_key="synth1_full_image")
    assert len(sdata["synth1_cells"]) == len(synth["synth1_true_nuclei"])
