from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from anndata import AnnData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.testing import assert_spatial_data_objects_are_identical
from spatialdata.transformations import Identity, Scale

import bitro as bt
from bitro.io._build import image_element, section_sdata

DS = "visium_ds"
FULL, HIRES, LOWRES = 1200, 300, 60  # image edges in pixels
SPOT_RADIUS = 20.0  # full-resolution pixels, i.e. a 55 um spot at 1.375 um/px


def _visium_like() -> sd.SpatialData:
    """Laid out like spatialdata_io.visium(..., dataset_id=DS, fullres_image_file=...)."""
    rng = np.random.default_rng(0)
    full = Image2DModel.parse(
        rng.integers(0, 255, (3, FULL, FULL), dtype=np.uint8),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=[2, 2],
        transformations={DS: Identity()},
    )

    def downscaled(edge):
        f = FULL / edge
        return Image2DModel.parse(
            rng.integers(0, 255, (3, edge, edge), dtype=np.uint8),
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            transformations={DS: Scale([f, f], axes=("y", "x")), f"{DS}_downscaled_{'hires' if edge == HIRES else 'lowres'}": Identity()},
        )

    xy = np.array([[100.0, 100.0], [300.0, 100.0], [200.0, 273.2], [900.0, 900.0]])
    spots = ShapesModel.parse(
        xy,
        geometry=0,
        radius=np.full(len(xy), SPOT_RADIUS),
        index=pd.Index(np.arange(len(xy)), name="spot_id"),
        transformations={DS: Identity(), f"{DS}_downscaled_hires": Scale([HIRES / FULL] * 2, axes=("x", "y"))},
    )
    obs = pd.DataFrame({"region": pd.Categorical([DS] * len(xy)), "spot_id": np.arange(len(xy)), "array_row": [0, 0, 1, 5]})
    table = TableModel.parse(
        AnnData(np.ones((len(xy), 2), dtype=np.float32), obs=obs, obsm={"spatial": xy}),
        region=DS,
        region_key="region",
        instance_key="spot_id",
    )
    return sd.SpatialData(
        images={f"{DS}_full_image": full, f"{DS}_hires_image": downscaled(HIRES), f"{DS}_lowres_image": downscaled(LOWRES)},
        shapes={DS: spots},
        tables={"table": table},
    )


def test_get_sections_on_the_spatialdata_io_visium_layout(tmp_path):
    sdata = _visium_like()
    with pytest.raises(ValueError, match=r"set_pixel_size\(sdata, 'visium_ds_full_image'"):
        bt.io.get_sections(sdata)  # spatialdata-io records no pixel size
    um_per_px = bt.io.set_pixel_size(sdata, f"{DS}_full_image", spot_diameter_um=55.0, spots_key=DS)
    assert um_per_px == pytest.approx(55.0 / (2 * SPOT_RADIUS))
    (section,) = bt.io.get_sections(sdata)  # the hires and lowres copies are not sections of their own
    assert section == bt.io.Section(
        sample=DS, image_key=f"{DS}_full_image", coordinate_system=DS, pixel_size=pytest.approx(1.375), spots_key=DS, cells_key=f"{DS}_cells"
    )
    # the micrometre system reaches the spots and the downscaled images consistently
    spots_um = sd.transform(sdata[DS], to_coordinate_system=f"{DS}_um")
    np.testing.assert_allclose(spots_um.geometry.x, sdata[DS].geometry.x * 1.375)
    hires_um = sd.get_extent(sdata[f"{DS}_hires_image"], coordinate_system=f"{DS}_um")
    assert hires_um["x"] == pytest.approx((0, FULL * 1.375))
    # and survives a round trip through zarr (not element-identical: zarr adds the channel axis to the
    # (y, x) Scale of spatialdata-io's hires image, which spatialdata's equality check tells apart)
    bt.io.write_zarr(sdata, tmp_path / "visium.zarr")
    back = sd.read_zarr(tmp_path / "visium.zarr")
    assert bt.io.get_sections(back) == [section]
    assert_spatial_data_objects_are_identical(sdata.subset([f"{DS}_full_image", DS, "table"]), back.subset([f"{DS}_full_image", DS, "table"]))


def test_get_sections_bitro_layout_several_sections():
    a = section_sdata("A", image_element(np.zeros((3, 64, 64), np.uint8), "A", 0.5))
    b = section_sdata("B", image_element(np.zeros((3, 32, 48), np.uint8), "B", 0.25))
    sdata = sd.SpatialData(images={**a.images, **b.images})
    sections = bt.io.get_sections(sdata)
    assert [(s.sample, s.image_key, s.coordinate_system, s.pixel_size, s.spots_key) for s in sections] == [
        ("A", "A_image", "A", 0.5, None),
        ("B", "B_image", "B", 0.25, None),
    ]
    assert [s.sample for s in bt.io.get_sections(sdata, samples=["B"])] == ["B"]
    with pytest.raises(KeyError, match=r"\['C'\] not found"):
        bt.io.get_sections(sdata, samples=["C"])


def test_get_sections_hand_made_global_layout():
    """Two images named "*_image" in the generic "global" system: both are sections, named after the images."""
    imgs = {
        k: Image2DModel.parse(np.zeros((3, n, n), np.uint8), dims=("c", "y", "x"), c_coords=["r", "g", "b"])
        for k, n in (("left_image", 40), ("right_image", 30))
    }
    sdata = sd.SpatialData(images=imgs)
    for k in imgs:
        bt.io.set_pixel_size(sdata, k, 0.5)
    assert [s.sample for s in bt.io.get_sections(sdata)] == ["left", "right"]
