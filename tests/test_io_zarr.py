from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import spatialdata as sd
from spatialdata.testing import assert_spatial_data_objects_are_identical

import bitro as bt
from bitro._constants import Key
from bitro._utils import scale0
from bitro.io._build import image_element, pyramid_image_element, section_sdata


def _small_sdata(value: int = 0, *, sample: str = "S") -> sd.SpatialData:
    return section_sdata(sample, image_element(np.full((3, 64, 48), value, dtype=np.uint8), sample, 0.5))


def test_write_zarr_round_trip_real_section(her2st_dir, tmp_path):
    sdata = bt.io.read_st(her2st_dir, "C2")
    # keep the test fast: the top-left 2048 x 2048 px of the real lazy pyramid (3 levels), all spots and counts
    image = sdata[Key.image("C2")]
    levels = [image[f"scale{k}"]["image"].data[:, : 2048 >> k, : 2048 >> k] for k in range(3)]
    sdata[Key.image("C2")] = pyramid_image_element(levels, "C2", bt.io.get_sections(sdata)[0].pixel_size)
    out = bt.io.write_zarr(sdata, tmp_path / "c2.zarr")
    assert out == (tmp_path / "c2.zarr").absolute() and sdata.path == out
    back = sd.read_zarr(out)
    assert_spatial_data_objects_are_identical(sdata, back)
    assert back[Key.SPOTS_TABLE].uns[Key.UNS][Key.READ_ST]["C2"]["n_spots"] == 187
    assert bt.io.get_sections(back)[0].pixel_size == pytest.approx(bt.io.get_sections(sdata)[0].pixel_size)


def test_write_zarr_refuses_existing_path(tmp_path):
    path = tmp_path / "a.zarr"
    bt.io.write_zarr(_small_sdata(1), path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        bt.io.write_zarr(_small_sdata(2), path)
    assert int(scale0(sd.read_zarr(path)[Key.image("S")]).max()) == 1  # untouched
    bt.io.write_zarr(_small_sdata(2), path, overwrite=True)
    assert int(scale0(sd.read_zarr(path)[Key.image("S")]).max()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr"]  # no temporary left behind


def test_write_zarr_never_replaces_other_files(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a zarr store"):
        bt.io.write_zarr(_small_sdata(), folder, overwrite=True)
    file = tmp_path / "file.zarr"
    file.write_text("x")
    with pytest.raises(FileExistsError, match="not a zarr store"):
        bt.io.write_zarr(_small_sdata(), file, overwrite=True)
    assert (folder / "notes.txt").read_text() == "keep me" and file.read_text() == "x"


def _fails(block):
    msg = "disk full"
    raise OSError(msg)


def test_failed_write_keeps_the_old_store(tmp_path):
    path = tmp_path / "b.zarr"
    bt.io.write_zarr(_small_sdata(7), path)
    broken = da.zeros((3, 64, 48), dtype=np.uint8, chunks=(3, 32, 48)).map_blocks(_fails, dtype=np.uint8)
    bad = section_sdata("S", image_element(broken, "S", 0.5))
    with pytest.raises(OSError, match="disk full"):
        bt.io.write_zarr(bad, path, overwrite=True)
    assert int(scale0(sd.read_zarr(path)[Key.image("S")]).max()) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.zarr"]


def test_write_zarr_back_onto_its_own_store(tmp_path):
    path = tmp_path / "c.zarr"
    bt.io.write_zarr(_small_sdata(3), path)
    lazy = sd.read_zarr(path)
    bt.io.write_zarr(lazy, path, overwrite=True)
    assert_spatial_data_objects_are_identical(_small_sdata(3), sd.read_zarr(path))


def test_write_zarr_does_not_flood_warnings(tmp_path):
    """anndata's "autosharding will be the default" UserWarning (once per array of every table) is not shown."""
    import warnings

    import anndata as ad

    sdata = bt.datasets.synthetic(n_samples=1, size=256)
    before = ad.settings.auto_shard_zarr_v3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bt.io.write_zarr(sdata, tmp_path / "s.zarr")
    assert not [w for w in caught if "autosharding" in str(w.message)]
    assert ad.settings.auto_shard_zarr_v3 is before  # the user's setting is left as it was
    back = sd.read_zarr(tmp_path / "s.zarr")
    assert back[Key.SPOTS_TABLE].n_obs == sdata[Key.SPOTS_TABLE].n_obs
