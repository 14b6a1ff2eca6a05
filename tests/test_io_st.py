from __future__ import annotations

import gzip
import logging

import dask
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import bitro as bt
from bitro._constants import Key
from bitro._utils import scale0
from bitro.io import _lazy_image
from bitro.io._st import fit_pixel_size

SECTIONS = ["B4", "C2", "C3", "C4"]


# --- real data ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def b4(her2st_dir):
    return bt.io.read_st(her2st_dir, "B4")


def _tissue_fraction(rgb: np.ndarray) -> np.ndarray:
    """Tissue = stained (saturation > 0.1) or dark (value < 0.8); glass background is bright and grey."""
    from skimage.color import rgb2hsv

    hsv = rgb2hsv(rgb.reshape(1, -1, 3).astype(float) / 255)[0]
    return (hsv[:, 1] > 0.1) | (hsv[:, 2] < 0.8)


@pytest.mark.parametrize("sample", SECTIONS)
def test_read_st_real_sections(her2st_dir, sample):
    sdata = bt.io.read_st(her2st_dir, sample)
    table, spots = sdata[Key.SPOTS_TABLE], sdata[Key.spots(sample)]
    level0 = sdata[Key.image(sample)]["scale0"]["image"]
    assert level0.dtype == np.uint8 and level0.sizes["c"] == 3 and level0.size > 80e6
    assert len(sdata[Key.image(sample)].children) >= 4  # multiscale
    pixel_size = bt.io.get_sections(sdata)[0].pixel_size
    assert 0.68 < pixel_size < 0.70
    # radius = 100 um at the measured pixel size (~72 px)
    assert np.allclose(spots["radius"] * 2 * pixel_size, 100.0)
    assert 70 < spots["radius"].iloc[0] < 75
    # spots one array step apart are 200 um apart (~289-291 px; single pairs scatter with the spot detection)
    xy = table.obsm[Key.SPATIAL]
    array_xy = np.c_[table.obs[Key.ARRAY_COL], table.obs[Key.ARRAY_ROW]]
    steps = np.abs(array_xy[:, None] - array_xy[None]).sum(-1)
    pitch = np.median(np.linalg.norm(xy[:, None] - xy[None], axis=-1)[steps == 1])
    assert 285 < pitch < 295
    assert pitch * pixel_size == pytest.approx(200, rel=0.01)
    # table and shapes agree; ids "{x}x{y}"; counts raw and sparse
    assert list(table.obs[Key.SPOT_ID]) == list(spots.index)
    assert np.allclose(np.c_[spots.geometry.x, spots.geometry.y], xy)
    assert all(i == f"{c}x{r}" for i, c, r in zip(spots.index, table.obs[Key.ARRAY_COL], table.obs[Key.ARRAY_ROW], strict=True))
    assert table.X.format == "csr" and table.X.dtype == np.float32
    assert np.all(table.X.data == np.round(table.X.data)) and table.X.sum() > 0
    assert (table.obs[Key.SAMPLE] == sample).all()
    # spot centres lie on tissue, whereas random pixels mostly do not
    img, r = level0.data, 7
    windows = [img[:, y - r : y + r + 1, x - r : x + r + 1].mean(axis=(1, 2)) for x, y in np.round(xy).astype(int)]
    centres = np.stack(dask.compute(*windows))
    assert _tissue_fraction(centres).mean() >= 0.95
    rng = np.random.default_rng(0)
    random_px = img.vindex[:, rng.integers(0, img.shape[1], 2000), rng.integers(0, img.shape[2], 2000)].compute()
    assert _tissue_fraction(random_px).mean() < 0.5  # vindex puts the points first: (2000, 3)


def test_read_st_opens_lazily_and_decodes_once(her2st_dir):
    _lazy_image.clear_cache()
    sdata = bt.io.read_st(her2st_dir, "C2")
    assert len(_lazy_image._cache) == 0  # opening read the header only
    image = sdata[Key.image("C2")]
    # a coarse level needs no full decode: libjpeg's reduced (1/8) decode
    coarse = image["scale3"]["image"][:, 500:515, 500:510].values
    assert [key[-1] for key in _lazy_image._cache] == [8]
    level0 = image["scale0"]["image"]
    crop = level0[:, 4000:4120, 4000:4080].values
    assert crop.shape == (3, 120, 80) and [key[-1] for key in _lazy_image._cache] == [8, 1]
    decoded = _lazy_image._cache[next(k for k in _lazy_image._cache if k[-1] == 1)]
    _ = level0[:, 100:300, 7000:9000].values  # another crop: the same decode
    _ = image["scale1"]["image"][:, 2000:2060, 2000:2040].values  # level 1 averages the same decode
    assert len(_lazy_image._cache) == 2 and any(v is decoded for v in _lazy_image._cache.values())
    np.testing.assert_array_equal(crop, decoded[4000:4120, 4000:4080].transpose(2, 0, 1))
    full = decoded.astype(float)
    block_mean = full[4000:4120, 4000:4080].reshape(15, 8, 10, 8, 3).mean(axis=(1, 3)).transpose(2, 0, 1)
    assert np.abs(coarse - block_mean).mean() < 1.0  # DCT-domain reduction ~ block mean
    _lazy_image.clear_cache()


def test_read_st_keeps_pil_limit(her2st_dir):
    before = Image.MAX_IMAGE_PIXELS
    sdata = bt.io.read_st(her2st_dir, "C3")
    _ = sdata[Key.image("C3")]["scale0"]["image"][:, :10, :10].values
    assert Image.MAX_IMAGE_PIXELS == before
    _lazy_image.clear_cache()


def test_read_st_given_pixel_size(her2st_dir):
    sdata = bt.io.read_st(her2st_dir, "C4", pixel_size=0.5, spot_diameter_um=110.0)
    assert bt.io.get_sections(sdata)[0].pixel_size == pytest.approx(0.5)
    assert sdata[Key.spots("C4")]["radius"].iloc[0] == pytest.approx(110.0)
    params = sdata[Key.SPOTS_TABLE].uns[Key.UNS][Key.READ_ST]["C4"]
    assert params["pixel_size_measured"] is False and params["spot_diameter_um"] == 110.0


# --- tiny hand-made sections for the bad paths ----------------------------------------------------

SPOTS = pd.DataFrame({"x": [1, 2, 1, 2], "y": [1, 1, 2, 2]})


def _write_section(folder, sample="S", *, image_mode="RGB", size=(80, 60), counts_ids=None, pixel=None, image_bytes=None, suffix=".jpg"):
    """A 2x2-spot section: array step = 20 px, spot centres at (20, 20) ... (40, 40)."""
    folder.mkdir(parents=True, exist_ok=True)
    sel = SPOTS.copy()
    sel["new_x"], sel["new_y"] = sel["x"].astype(float), sel["y"].astype(float)
    sel["pixel_x"], sel["pixel_y"] = (pixel if pixel is not None else (sel["x"] * 20.0, sel["y"] * 20.0))
    sel.to_csv(folder / f"{sample}_selection.tsv", sep="\t", index=False)
    ids = counts_ids if counts_ids is not None else [f"{x}x{y}" for x, y in zip(SPOTS["x"], SPOTS["y"], strict=True)]
    counts = pd.DataFrame(np.arange(len(ids) * 3).reshape(len(ids), 3), index=ids, columns=["GA", "GB", "GC"])
    with gzip.open(folder / f"{sample}.tsv.gz", "wt") as f:
        counts.to_csv(f, sep="\t")
    image = folder / f"{sample}{suffix}"
    if image_bytes is not None:
        image.write_bytes(image_bytes)
    else:
        channels = len(image_mode) if image_mode != "L" else 1
        rng = np.random.default_rng(0)
        arr = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8).squeeze()
        Image.fromarray(arr, mode=image_mode).save(image)
    return folder


def test_tiny_section_reads(tmp_path):
    folder = _write_section(tmp_path / "ok")
    sdata = bt.io.read_st(folder, "S")
    assert sdata[Key.SPOTS_TABLE].shape == (4, 3)
    assert bt.io.get_sections(sdata)[0].pixel_size == pytest.approx(200 / 20)
    assert scale0(sdata[Key.image("S")]).shape == (3, 60, 80)


def test_missing_files(tmp_path):
    folder = _write_section(tmp_path / "m")
    (folder / "S.tsv.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"S\.tsv\.gz"):
        bt.io.read_st(folder, "S")
    with pytest.raises(FileNotFoundError, match="is missing"):
        bt.io.read_st(folder, "T")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        bt.io.read_st(folder / "nope", "S")


def test_counts_and_coordinates_share_no_spot(tmp_path):
    folder = _write_section(tmp_path / "n", counts_ids=["7x7", "8x8"])
    with pytest.raises(ValueError, match="share no spot"):
        bt.io.read_st(folder, "S")


def test_spots_in_one_file_only_are_dropped_with_a_warning(tmp_path, caplog_bitro):
    folder = _write_section(tmp_path / "p", counts_ids=["1x1", "2x1", "1x2", "9x9", "8x9"])
    with caplog_bitro.at_level(logging.WARNING, logger="bitro"):
        sdata = bt.io.read_st(folder, "S")
    assert "dropped 2 spots found only in S.tsv.gz and 1 found only in S_selection.tsv" in caplog_bitro.text
    assert sorted(sdata[Key.spots("S")].index) == ["1x1", "1x2", "2x1"]
    assert sdata[Key.SPOTS_TABLE].n_obs == 3


def test_coordinates_outside_the_image(tmp_path):
    folder = _write_section(tmp_path / "o", pixel=(SPOTS["x"] * 200.0, SPOTS["y"] * 200.0))
    with pytest.raises(ValueError, match=r"4 of 4 spot centres .* lie outside the image .*S\.jpg"):
        bt.io.read_st(folder, "S")


def test_grayscale_image_is_refused(tmp_path):
    folder = _write_section(tmp_path / "g", image_mode="L")
    with pytest.raises(ValueError, match=r"mode 'L'.*RGB"):
        bt.io.read_st(folder, "S")


def test_rgba_image_drops_alpha_with_a_warning(tmp_path, caplog_bitro):
    folder = _write_section(tmp_path / "a", image_mode="RGBA", suffix=".png")
    with caplog_bitro.at_level(logging.WARNING, logger="bitro"):
        sdata = bt.io.read_st(folder, "S")
    assert "alpha channel" in caplog_bitro.text
    level0 = scale0(sdata[Key.image("S")])
    with Image.open(folder / "S.png") as im:
        expected = np.asarray(im)[..., :3].transpose(2, 0, 1)
    np.testing.assert_array_equal(level0.values, expected)
    _lazy_image.clear_cache()


def test_unreadable_and_truncated_images(tmp_path, her2st_dir):
    folder = _write_section(tmp_path / "u", image_bytes=b"this is not a jpeg")
    with pytest.raises(ValueError, match=r"Cannot read the image .*S\.jpg"):
        bt.io.read_st(folder, "S")
    truncated = (her2st_dir / "C2.jpg").read_bytes()[:200_000]
    folder = _write_section(tmp_path / "t", image_bytes=truncated)
    with pytest.raises(ValueError, match=r"truncated"):
        bt.io.read_st(folder, "S")


def test_bad_numbers(tmp_path):
    folder = _write_section(tmp_path / "b")
    with pytest.raises(ValueError, match="pixel_size"):
        bt.io.read_st(folder, "S", pixel_size=0)
    with pytest.raises(ValueError, match="spot_diameter_um"):
        bt.io.read_st(folder, "S", spot_diameter_um=-1)
    collinear = pd.DataFrame({"x": [1, 2, 3], "y": [1, 1, 1], "pixel_x": [1.0, 2, 3], "pixel_y": [5.0, 5, 5]})
    with pytest.raises(ValueError, match="not on one line"):
        fit_pixel_size(collinear, array_pitch_um=200.0)


def test_bad_tables(tmp_path):
    folder = _write_section(tmp_path / "c")
    pd.DataFrame({"a": [1], "b": [2]}).to_csv(folder / "S_selection.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match=r"lack the columns .*pixel_x"):
        bt.io.read_st(folder, "S")
    folder = _write_section(tmp_path / "d")
    with gzip.open(folder / "S.tsv.gz", "wt") as f:
        f.write("\tGA\nspotA\t1\n")
    with pytest.raises(ValueError, match=r"row names '\{x\}x\{y\}'"):
        bt.io.read_st(folder, "S")
