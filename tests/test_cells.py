from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import shapely
from shapely.geometry import Point

import bitro as bt
from bitro._constants import Key
from bitro.io._build import image_element, polygons_element, section_sdata, spots_element
from bitro.pp._cells import assign_spots, resample_matrix
from bitro.pp._morphology import morphology

PX = 0.5  # um per pixel


def _render(size: int, xy: np.ndarray, radius: np.ndarray, darkness: np.ndarray, seed: int = 0) -> np.ndarray:
    """A pink background with dark round nuclei, (3, y, x) uint8."""
    rng = np.random.default_rng(seed)
    img = np.empty((3, size, size), np.float32)
    img[0], img[1], img[2] = 235, 190, 215
    yy, xx = np.mgrid[:size, :size] + 0.5
    for (x, y), r, d in zip(xy, radius, darkness, strict=True):
        sl = (slice(max(int(y - r - 1), 0), int(y + r + 2)), slice(max(int(x - r - 1), 0), int(x + r + 2)))
        inside = (yy[sl] - y) ** 2 + (xx[sl] - x) ** 2 <= r**2
        for c, base in enumerate((90, 60, 150)):
            img[c][sl][inside] = base / d
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def toy_sdata(samples=("s0",), *, size: int = 600, n_cells: int = 120, seed: int = 0, cells=True):
    """Sections with two nucleus types (small dark / large pale), a 2 x 2 spot grid and cell polygons."""
    import spatialdata as sd

    parts = []
    for k, sample in enumerate(samples):
        rng = np.random.default_rng(seed + k)
        xy = rng.uniform(20, size - 20, (n_cells, 2))
        kind = rng.integers(0, 2, n_cells)
        radius = np.where(kind == 0, 5.0, 9.0) + rng.uniform(-0.5, 0.5, n_cells)
        img = _render(size, xy, radius, np.where(kind == 0, 1.6, 1.0), seed=seed + k)
        spots_xy = np.array(
            [[size / 4, size / 4], [3 * size / 4, size / 4], [size / 4, 3 * size / 4], [3 * size / 4, 3 * size / 4]]
        )
        s = section_sdata(
            sample,
            image_element(img, sample, PX, scale_factors=[2]),
            spots_element(spots_xy, 100.0, [f"sp{i}" for i in range(4)], sample, PX),
        )
        if cells:
            polys = [Point(x, y).buffer(r, quad_segs=16) for (x, y), r in zip(xy, radius, strict=True)]
            s.shapes[Key.cells(sample)] = polygons_element(polys, [f"c{i}" for i in range(n_cells)], sample, PX)
        parts.append(s)
    return sd.concatenate(parts) if len(parts) > 1 else parts[0]


@pytest.fixture(scope="module")
def toy():
    return toy_sdata()


@pytest.fixture(scope="module")
def toy_cells(toy):
    return bt.pp.extract_cells(toy, n_components=16)


def test_cell_table_contents(toy, toy_cells):
    from spatialdata.models import get_table_keys

    cells = toy_cells
    assert toy.tables[Key.CELLS_TABLE] is cells
    assert cells.n_obs == 120
    region, region_key, instance_key = get_table_keys(cells)
    assert (list(np.atleast_1d(region)), region_key, instance_key) == (["s0_cells"], Key.REGION, Key.CELL_ID)
    assert set(cells.obs[Key.CELL_ID]) == set(toy.shapes["s0_cells"].index)
    for col in (Key.SAMPLE, Key.SPOT_ID, *Key.MORPHOLOGY):
        assert col in cells.obs
    raw = cells.obsm[Key.FEATURES_RAW]
    assert raw.shape == (120, len(Key.MORPHOLOGY) + 31)
    assert cells.obsm[Key.FEATURES].shape == (120, 16)
    centroids = shapely.get_coordinates(toy.shapes["s0_cells"].geometry.centroid.values)
    np.testing.assert_allclose(cells.obsm[Key.SPATIAL], centroids)
    uns = cells.uns[Key.UNS]
    assert uns[Key.PIXEL_SIZE] == {"s0": pytest.approx(PX)}
    assert uns[Key.EXTRACT_CELLS]["encoder"] == "handcrafted"
    assert uns[Key.EXTRACT_CELLS]["reducer"]["pca_components"].shape == (16, raw.shape[1])
    assert uns[Key.SEGMENTATION]["s0"]["shapes_key"] == "s0_cells"
    # the features separate the two nucleus types (large pale vs small dark)
    area = cells.obs[Key.AREA_UM2].to_numpy()
    big = area > np.median(area)
    h = cells.obs["haematoxylin_nucleus"].to_numpy()
    assert h[~big].mean() > h[big].mean()



def test_morphology_columns_are_tied_to_key_by_name(toy, toy_cells, monkeypatch):
    """Reordering Key.MORPHOLOGY reorders the features of a new table; no value moves to another column's name."""
    from bitro.pp._morphology import SHAPE_COLUMNS, STAIN_COLUMNS

    assert sorted(SHAPE_COLUMNS + STAIN_COLUMNS) == sorted(Key.MORPHOLOGY)
    shuffled = tuple(reversed(Key.MORPHOLOGY))
    monkeypatch.setattr(Key, "MORPHOLOGY", shuffled)
    cells = bt.pp.extract_cells(toy, n_components=16, key_added="shuffled")
    n = len(shuffled)
    assert cells.uns[Key.UNS][Key.EXTRACT_CELLS]["feature_names"][:n] == list(shuffled)
    for j, name in enumerate(shuffled):
        np.testing.assert_array_equal(cells.obs[name], toy_cells.obs[name], err_msg=name)
        np.testing.assert_array_equal(cells.obsm[Key.FEATURES_RAW][:, j], toy_cells.obs[name].to_numpy(np.float32))

def test_table_writes_and_reads_back(toy, toy_cells, tmp_path):
    import spatialdata as sd

    toy.write(tmp_path / "toy.zarr")
    back = sd.read_zarr(tmp_path / "toy.zarr")
    cells = back.tables[Key.CELLS_TABLE]
    np.testing.assert_array_equal(cells.obsm[Key.FEATURES], toy_cells.obsm[Key.FEATURES])
    assert cells.obs[Key.SPOT_ID].isna().sum() == toy_cells.obs[Key.SPOT_ID].isna().sum()


def test_morphology_matches_regionprops():
    from shapely import affinity
    from skimage.draw import polygon as draw_polygon
    from skimage.measure import regionprops

    ellipse = affinity.rotate(affinity.scale(Point(60, 60).buffer(1, quad_segs=64), 30, 12), 30)
    morph = morphology(np.array([ellipse]), 0.5).iloc[0]
    xy = np.asarray(ellipse.exterior.coords)
    mask = np.zeros((120, 120), bool)
    rr, cc = draw_polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, mask.shape)
    mask[rr, cc] = True
    props = regionprops(mask.astype(int))[0]
    assert morph[Key.AREA_UM2] == pytest.approx(props.area * 0.25, rel=0.03)
    assert morph["major_axis_um"] == pytest.approx(props.axis_major_length * 0.5, rel=0.03)
    assert morph["minor_axis_um"] == pytest.approx(props.axis_minor_length * 0.5, rel=0.05)
    assert morph["eccentricity"] == pytest.approx(props.eccentricity, abs=0.01)
    assert morph["solidity"] == pytest.approx(1.0, abs=0.01)


def test_spot_assignment_geometry():
    spots = np.array([[100.0, 100.0], [400.0, 100.0]])
    r = np.array([50.0, 30.0])
    angles = np.linspace(0, 2 * np.pi, 7)[:-1]
    pts, expected = [], []
    for (cx, cy), rad, sid in zip(spots, r, ["a", "b"], strict=True):
        for a in angles:
            for d, inside in ((rad - 1, True), (rad + 1, False), (rad * (1 - 1e-9), True)):
                pts.append([cx + d * np.cos(a), cy + d * np.sin(a)])
                expected.append(sid if inside else None)
    got = assign_spots(np.array(pts), spots, r, ["a", "b"])
    assert list(got) == expected


def test_spot_assignment_in_table():
    """Cells at r - 1 px from a spot centre land in it, at r + 1 px they do not (through extract_cells)."""
    sdata = toy_sdata(cells=False)
    spots = sdata.shapes["s0_spots"]
    (cx, cy), r = shapely.get_coordinates(spots.geometry.values)[0], float(spots["radius"].iloc[0])
    centres = [(cx + r - 1, cy), (cx + r + 1, cy), (cx, cy - r + 1), (cx, cy - r - 1)]
    polys = [Point(x, y).buffer(3) for x, y in centres]
    sdata.shapes["s0_cells"] = polygons_element(polys, ["in1", "out1", "in2", "out2"], "s0", PX)
    cells = bt.pp.extract_cells(sdata)
    spot = cells.obs.set_index(Key.CELL_ID)[Key.SPOT_ID]
    assert spot["in1"] == spot["in2"] == spots.index[0]
    assert pd.isna(spot["out1"]) and pd.isna(spot["out2"])
    assert cells.obs[Key.SPOT_ID].dtype == "category"


def test_reference_reuse_gives_identical_features(toy, toy_cells):
    again = bt.pp.extract_cells(toy, reference=toy_cells, key_added="cells_again")
    np.testing.assert_array_equal(again.obsm[Key.FEATURES], toy_cells.obsm[Key.FEATURES])
    assert again.uns[Key.UNS]["extract_cells"]["fitted_on"] == "reference"
    other = toy_sdata(["s9"], seed=5)
    new = bt.pp.extract_cells(other, reference=toy_cells.uns[Key.UNS]["extract_cells"])
    ref = toy_cells.uns[Key.UNS]["extract_cells"]["reducer"]
    np.testing.assert_array_equal(new.uns[Key.UNS]["extract_cells"]["reducer"]["pca_components"], ref["pca_components"])
    # the same transform: feature k of the new slide is the reference's projection
    z = (new.obsm[Key.FEATURES_RAW] - ref["scaler_mean"]) / ref["scaler_scale"]
    np.testing.assert_allclose(
        new.obsm[Key.FEATURES], (z - ref["pca_mean"]) @ ref["pca_components"].T, rtol=1e-4, atol=1e-4
    )


def test_tiles_and_processes_do_not_change_features(toy, toy_cells):
    old = bt.settings.tile_size
    bt.settings.tile_size = 128  # many seams through the cells' crops
    try:
        tiled = bt.pp.extract_cells(toy, reference=toy_cells, key_added="tiled", n_jobs=2)
    finally:
        bt.settings.tile_size = old
    n_morph = len(Key.MORPHOLOGY)
    tiled_raw, raw = tiled.obsm[Key.FEATURES_RAW], toy_cells.obsm[Key.FEATURES_RAW]
    np.testing.assert_array_equal(tiled_raw[:, :n_morph], raw[:, :n_morph])  # morphology: exact
    # the encoder works on float32 batches, whose make-up the tiles change: equal up to float32 rounding
    np.testing.assert_allclose(tiled_raw[:, n_morph:], raw[:, n_morph:], rtol=1e-5, atol=1e-6)


def test_dask_client_gives_the_same_features(toy, toy_cells):
    from dask.distributed import Client

    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        dist = bt.pp.extract_cells(toy, reference=toy_cells, key_added="dist", client=client)
    np.testing.assert_array_equal(dist.obsm[Key.FEATURES_RAW], toy_cells.obsm[Key.FEATURES_RAW])


def test_serial_processes_and_dask_worker_processes_agree(toy, toy_cells):
    """Tiles sent to local processes and to the worker processes of a real LocalCluster give identical features."""
    from dask.distributed import Client, LocalCluster, get_task_stream

    old = bt.settings.tile_size
    bt.settings.tile_size = 160  # 16 tiles: more than the 4 tasks kept in flight
    try:
        serial = bt.pp.extract_cells(toy, reference=toy_cells, key_added="serial", n_jobs=1)
        procs = bt.pp.extract_cells(toy, reference=toy_cells, key_added="procs", n_jobs=2)
        with (
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
            Client(cluster) as client,
            get_task_stream(client) as stream,
        ):
            dist = bt.pp.extract_cells(toy, reference=toy_cells, key_added="dask", client=client)
            workers = set(client.nthreads())
    finally:
        bt.settings.tile_size = old
    ran = [t for t in stream.data if t["key"].startswith("_tile_features")]
    assert len(ran) == 16 and {t["worker"] for t in ran} <= workers  # every tile ran on a worker process
    for other in (procs, dist):
        assert list(other.obs_names) == list(serial.obs_names)
        np.testing.assert_array_equal(other.obsm[Key.FEATURES_RAW], serial.obsm[Key.FEATURES_RAW])
        np.testing.assert_array_equal(other.obsm[Key.FEATURES], serial.obsm[Key.FEATURES])


def test_crop_covers_the_same_tissue_at_another_pixel_size(toy, toy_cells):
    """A 2x coarser scan of the same tissue gives crops of the same area: features stay close."""
    import spatialdata as sd
    from shapely import affinity

    from bitro._utils import scale0

    full = scale0(toy.images["s0_image"]).values.astype(np.float32)
    half = full.reshape(3, 300, 2, 300, 2).mean(axis=(2, 4)).round().astype(np.uint8)
    polys = [affinity.scale(p, 0.5, 0.5, origin=(0, 0)) for p in toy.shapes["s0_cells"].geometry]
    coarse = sd.SpatialData(
        images={"s0_image": image_element(half, "s0", 2 * PX, scale_factors=[])},
        shapes={"s0_cells": polygons_element(polys, toy.shapes["s0_cells"].index, "s0", 2 * PX)},
    )
    c = bt.pp.extract_cells(coarse, reference=toy_cells)
    np.testing.assert_allclose(c.obs[Key.AREA_UM2], toy_cells.obs[Key.AREA_UM2], rtol=1e-6)
    a, b = c.obsm[Key.FEATURES][:, 0], toy_cells.obsm[Key.FEATURES][:, 0]
    assert np.corrcoef(a, b)[0, 1] > 0.9


def test_resample_matrix():
    for src, dst in ((35, 48), (96, 48), (48, 48), (50, 48)):
        m = resample_matrix(src, dst)
        assert m.shape == (dst, src)
        np.testing.assert_allclose(m.sum(axis=1), 1, atol=1e-5)
        ramp = np.arange(src) + 0.5
        centres = (np.arange(dst) + 0.5) * src / dst
        np.testing.assert_allclose(m @ ramp, centres, atol=0.51)


def test_several_sections():
    sdata = toy_sdata(["a", "b"], n_cells=40)
    cells = bt.pp.extract_cells(sdata, n_components=8)
    assert cells.n_obs == 80
    assert sorted(cells.obs[Key.REGION].cat.categories) == ["a_cells", "b_cells"]
    assert set(cells.obs[Key.SAMPLE]) == {"a", "b"}
    assert cells.obs_names.is_unique
    assert set(cells.uns[Key.UNS][Key.PIXEL_SIZE]) == {"a", "b"}
    one = bt.pp.extract_cells(sdata, image_key="b_image", shapes_key="b_cells", key_added="b_only")
    assert set(one.obs[Key.SAMPLE]) == {"b"}
    # images given per sample, e.g. stain-normalised copies named otherwise
    sdata.images["b_image_copy"] = sdata.images["b_image"]
    copy = bt.pp.extract_cells(sdata, image_key={"b": "b_image_copy"}, key_added="b_copy", reference=one)
    np.testing.assert_array_equal(copy.obsm[Key.FEATURES], one.obsm[Key.FEATURES])
    assert copy.uns[Key.UNS]["extract_cells"]["image_key"] == {"b": "b_image_copy"}


def test_zero_cells_gives_an_empty_valid_table():
    """A section segmented without finding a nucleus (no shapes element: spatialdata cannot hold an empty one)."""
    sdata = toy_sdata(cells=False)
    sdata.attrs[Key.UNS] = {Key.SEGMENTATION: {"s0": {"shapes_key": "s0_cells", "n_cells": 0}}}
    with pytest.warns(UserWarning, match="No cells"):
        cells = bt.pp.extract_cells(sdata)
    assert cells.n_obs == 0
    assert cells.obsm[Key.FEATURES_RAW].shape == (0, len(Key.MORPHOLOGY) + 31)
    assert Key.CELLS_TABLE in sdata.tables
    with pytest.warns(UserWarning, match="empty"):
        bt.pp.phenotypes(cells, n_clusters=3)
    with pytest.warns(UserWarning, match="empty"):
        bt.pp.spatial_graph(cells)
    assert cells.obsp[Key.CONNECTIVITIES].shape == (0, 0)


def test_bad_input(toy, toy_cells):
    import anndata as ad

    before = set(toy.tables)
    with pytest.raises(KeyError, match=r"'nuclei' not found.*s0_cells.*s0_spots.*segment_nuclei"):
        bt.pp.extract_cells(toy, shapes_key="nuclei")
    with pytest.raises(KeyError, match=r"Image 'nope' not found"):
        bt.pp.extract_cells(toy, image_key="nope")
    with pytest.raises(ValueError, match="crop_um"):
        bt.pp.extract_cells(toy, crop_um=0)
    with pytest.raises(TypeError, match="SpatialData"):
        bt.pp.extract_cells(toy_cells)
    with pytest.raises(ValueError, match="encoder is .* for these settings but 'handcrafted' for the reference"):
        bt.pp.extract_cells(toy, encoder=lambda crops: np.zeros((len(crops), 3)), reference=toy_cells, key_added="x")
    with pytest.raises(ValueError, match="crop_um is 30.0 for these settings but 24.0 for the reference"):
        bt.pp.extract_cells(toy, crop_um=30.0, reference=toy_cells, key_added="x")
    with pytest.raises(ValueError, match="extract_cells"):
        bt.pp.extract_cells(toy, reference=ad.AnnData(), key_added="x")
    assert set(toy.tables) == before


def test_image_must_be_uint8_rgb():
    import spatialdata as sd

    sdata = toy_sdata()
    from spatialdata.models import Image2DModel

    from bitro.io._build import section_transformations

    gray = Image2DModel.parse(
        np.zeros((1, 64, 64), np.uint8), dims=("c", "y", "x"), transformations=section_transformations("s0", PX)
    )
    bad = sd.SpatialData(images={"s0_image": gray}, shapes={"s0_cells": sdata.shapes["s0_cells"]})
    with pytest.raises(ValueError, match="uint8 RGB"):
        bt.pp.extract_cells(bad)


def test_shapes_in_another_coordinate_system():
    import geopandas as gpd
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    sdata = toy_sdata(cells=False)
    gdf = gpd.GeoDataFrame(geometry=[Point(50, 50).buffer(4)], index=pd.Index(["c0"], name=Key.CELL_ID))
    sdata.shapes["s0_cells"] = ShapesModel.parse(gdf, transformations={"other": Identity()})
    with pytest.raises(ValueError, match=r"not in the coordinate system 's0'.*\['other'\]"):
        bt.pp.extract_cells(sdata)
    assert Key.CELLS_TABLE not in sdata.tables


def test_cell_table_row_names_are_readable_and_unique():
    """Cells named "{sample}_{i}" by the segmentation keep that name as their row (not "B4_B4_0"); others get it."""
    import anndata as ad

    from bitro.io._build import cells_table

    def section(sample, ids):
        a = ad.AnnData(obs=pd.DataFrame({Key.SAMPLE: sample}, index=pd.Index(ids)))
        a.obsm[Key.SPATIAL] = np.zeros((len(ids), 2))
        return a

    table = cells_table([section("B4", ["B4_0", "B4_1"]), section("C2", ["0", "1"])])
    assert list(table.obs_names) == ["B4_0", "B4_1", "C2_0", "C2_1"]
    assert list(table.obs[Key.CELL_ID]) == ["B4_0", "B4_1", "0", "1"]  # the shapes' own ids, unchanged
    # ids kept as they are would clash across sections ("a_b" + "0" vs "a" + "b_0"): every row gets its sample
    table = cells_table([section("a_b", ["a_b_0"]), section("a", ["b_0"])])
    assert list(table.obs_names) == ["a_b_a_b_0", "a_b_0"]
    assert table.obs_names.is_unique
