from __future__ import annotations

import subprocess
import sys
from functools import partial

import numpy as np
import pytest

import bitro as bt
from bitro._constants import Key
from bitro._parallel import map_tasks


def test_import_does_not_load_deep_learning_stack():
    code = (
        "import sys, bitro; "
        "bad = [m for m in ('torch', 'torch_geometric', 'peft', 'transformers') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"`import bitro` imported {out}"


def test_public_layout():
    for sub in ("pp", "tl", "pl", "io", "datasets"):
        assert hasattr(bt, sub)
    assert bt.logger.name == "bitro"
    assert isinstance(bt.__version__, str)


def test_key_names():
    assert Key.image("B4") == "B4_image"
    assert Key.spots("B4") == "B4_spots"
    assert Key.cells("B4") == "B4_cells"
    assert Key.microns("B4") == "B4_um"
    assert Key.CONNECTIVITIES == f"{Key.GRAPH}_connectivities"


def test_settings_data_dir_from_environment(tmp_path):
    code = "import bitro; print(bitro.settings.data_dir)"
    env = {"BITRO_HER2ST_DIR": str(tmp_path), "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == str(tmp_path)


def _square(x: int, offset: int = 0) -> int:
    return x * x + offset


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_map_tasks_keeps_order(n_jobs):
    assert map_tasks(partial(_square, offset=1), list(range(7)), n_jobs=n_jobs) == [x * x + 1 for x in range(7)]


def _section():
    import anndata as ad
    import pandas as pd

    from bitro.io._build import image_element, section_sdata, spots_element, spots_table

    xy = np.array([[100.0, 100.0], [300.0, 300.0]])
    a = ad.AnnData(np.ones((2, 3), np.float32), obs=pd.DataFrame({Key.SAMPLE: "S1"}, index=["1x1", "2x2"]))
    a.obsm[Key.SPATIAL] = xy
    return section_sdata(
        "S1",
        image_element(np.zeros((3, 600, 500), np.uint8), "S1", 0.5),
        spots_element(xy, 50.0, ["1x1", "2x2"], "S1", 0.5),
        spots_table([a]),
    )


def test_get_sections_on_bitro_layout():
    (section,) = bt.io.get_sections(_section())
    assert section.sample == "S1"
    assert section.image_key == "S1_image"
    assert section.coordinate_system == "S1"
    assert section.spots_key == "S1_spots"
    assert section.pixel_size == pytest.approx(0.5)


def test_set_pixel_size_bad_input():
    sdata = _section()
    with pytest.raises(ValueError, match="exactly one"):
        bt.io.set_pixel_size(sdata, "S1_image")
    with pytest.raises(ValueError, match="positive"):
        bt.io.set_pixel_size(sdata, "S1_image", -1.0)
    with pytest.raises(KeyError, match="S1_image"):
        bt.io.set_pixel_size(sdata, "nope", 1.0)
    # the failed calls changed nothing
    assert bt.io.get_sections(sdata)[0].pixel_size == pytest.approx(0.5)


def test_set_pixel_size_from_spot_diameter():
    sdata = _section()
    assert bt.io.set_pixel_size(sdata, "S1_image", spot_diameter_um=55.0, spots_key="S1_spots") == pytest.approx(0.55)
    assert bt.io.get_sections(sdata)[0].pixel_size == pytest.approx(0.55)


def test_get_sections_with_image_per_sample():
    sdata = _section()
    sdata.images["S1_image_normalized"] = sdata.images["S1_image"]
    (section,) = bt.io.get_sections(sdata, image_key={"S1": "S1_image_normalized"})
    assert (section.sample, section.image_key, section.spots_key) == ("S1", "S1_image_normalized", "S1_spots")
    with pytest.raises(KeyError, match="nope"):
        bt.io.get_sections(sdata, image_key={"S1": "nope"})
