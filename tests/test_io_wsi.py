from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd
import tifffile
from spatialdata.testing import assert_spatial_data_objects_are_identical
from spatialdata.transformations import get_transformation

import bitro as bt
from bitro._constants import Key

SHAPE = (1000, 1200, 3)


@pytest.fixture(scope="module")
def rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, SHAPE, dtype=np.uint8)


def _write_pyramid(path, data, *, resolution=None, description=None, levels=3):
    """A tiled pyramidal TIFF: full resolution with ``levels - 1`` halvings in SubIFDs."""
    kwargs = {"resolution": resolution, "resolutionunit": "CENTIMETER"} if resolution else {}
    with tifffile.TiffWriter(path) as tw:
        photometric = "rgb" if data.ndim == 3 else "minisblack"
        tw.write(data, tile=(256, 256), subifds=levels - 1, photometric=photometric, description=description, **kwargs)
        for k in range(1, levels):
            tw.write(data[:: 2**k, :: 2**k], tile=(256, 256), subfiletype=1, photometric=photometric)
    return path


def test_read_wsi_levels_and_pixel_size(tmp_path, rgb):
    path = _write_pyramid(tmp_path / "slide-1.tif", rgb, resolution=(1e4 / 0.5, 1e4 / 0.5))
    sdata = bt.io.read_wsi(path)
    image = sdata[Key.image("slide-1")]
    shapes = [image[f"scale{k}"]["image"].shape for k in range(3)]
    assert shapes == [(3, 1000, 1200), (3, 500, 600), (3, 250, 300)]
    assert bt.io.get_sections(sdata)[0].pixel_size == pytest.approx(0.5)
    # every stored level is used as is (no resampling), mapped to full-resolution pixels
    level2 = image["scale2"]["image"]
    np.testing.assert_array_equal(level2[:, 10:20, 30:40].values, rgb[::4, ::4][10:20, 30:40].transpose(2, 0, 1))
    t = get_transformation(level2, to_coordinate_system="slide-1").to_affine_matrix(("x", "y"), ("x", "y"))
    assert np.allclose(np.diag(t)[:2], 4)
    assert any(name.startswith("from-zarr") for name in image["scale0"]["image"].data.dask.layers)  # tiles on demand
    np.testing.assert_array_equal(image["scale0"]["image"][:, 700:760, 900:1000].values, rgb[700:760, 900:1000].transpose(2, 0, 1))


def test_read_wsi_svs_mpp_and_given_pixel_size(tmp_path, rgb):
    desc = "Aperio Image Library v12.0.15\n1200x1000 [0,0 1200x1000] (256x256) JPEG/RGB Q=70|AppMag = 20|MPP = 0.2520"
    path = _write_pyramid(tmp_path / "case.svs", rgb, description=desc, levels=2)
    sdata = bt.io.read_wsi(path, sample="case")
    assert bt.io.get_sections(sdata)[0].pixel_size == pytest.approx(0.252)
    assert len(sdata[Key.image("case")].children) == 2
    assert bt.io.get_sections(bt.io.read_wsi(path, sample="case", pixel_size=0.3))[0].pixel_size == pytest.approx(0.3)


def test_read_wsi_round_trip(tmp_path, rgb):
    sdata = bt.io.read_wsi(_write_pyramid(tmp_path / "s.tif", rgb, resolution=(2e4, 2e4)), sample="s")
    bt.io.write_zarr(sdata, tmp_path / "s.zarr")
    assert_spatial_data_objects_are_identical(sdata, sd.read_zarr(tmp_path / "s.zarr"))


def test_read_wsi_bad_input(tmp_path, rgb):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bt.io.read_wsi(tmp_path / "missing.svs")
    no_mpp = _write_pyramid(tmp_path / "nompp.tif", rgb, levels=1)
    with pytest.raises(ValueError, match=r"nompp\.tif.*no pixel size.*pixel_size="):
        bt.io.read_wsi(no_mpp)
    assert bt.io.get_sections(bt.io.read_wsi(no_mpp, pixel_size=0.25))[0].pixel_size == pytest.approx(0.25)
    gray = _write_pyramid(tmp_path / "gray.tif", rgb[..., 0], resolution=(2e4, 2e4))
    with pytest.raises(ValueError, match=r"gray\.tif.*8-bit RGB"):
        bt.io.read_wsi(gray)
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"not a tiff at all")
    with pytest.raises(ValueError, match=r"Cannot read .*junk\.svs"):
        bt.io.read_wsi(junk)
    with pytest.raises(ValueError, match="pixel_size"):
        bt.io.read_wsi(no_mpp, pixel_size=-1.0)


def test_read_wsi_ome_physical_size(tmp_path, rgb):
    path = tmp_path / "img.ome.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", tile=(256, 256), metadata={"axes": "YXS", "PhysicalSizeX": 400, "PhysicalSizeXUnit": "nm"})
    sdata = bt.io.read_wsi(path)
    (section,) = bt.io.get_sections(sdata)
    assert section.sample == "img" and section.pixel_size == pytest.approx(0.4)
