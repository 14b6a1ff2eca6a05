from __future__ import annotations

import json
import logging

import geopandas as gpd
import numpy as np
import pytest
import shapely

import bitro as bt
from bitro._constants import Key
from bitro._utils import scale0
from bitro.io._build import image_element, section_sdata
from bitro.pp._segment import haematoxylin
from bitro.pp._tiles import read_tile, tile_grid

SIZE = 640


@pytest.fixture(scope="module")
def _synth():
    return bt.datasets.synthetic(n_samples=1, size=SIZE, seed=3)


@pytest.fixture
def synth(_synth):
    """A fresh shallow copy of one small synthetic section (images shared, shapes copied)."""
    from spatialdata import SpatialData

    return SpatialData(images=dict(_synth.images), shapes={k: v.copy() for k, v in _synth.shapes.items()})


def _sample(sdata) -> str:
    return bt.io.get_sections(sdata)[0].sample


def _match(pred: np.ndarray, true: np.ndarray, min_iou: float = 0.5) -> tuple[float, float]:
    """Precision and recall of predicted vs true polygons, a pair matching when its IoU >= min_iou."""
    tree = shapely.STRtree(true)
    p, t = tree.query(pred, predicate="intersects")
    inter = shapely.area(shapely.intersection(pred[p], true[t]))
    iou = inter / (shapely.area(pred[p]) + shapely.area(true[t]) - inter)
    hit = iou >= min_iou  # IoU > 0.5 makes a match one-to-one
    return len(np.unique(p[hit])) / len(pred), len(np.unique(t[hit])) / len(true)


def _threshold_labels(rgb: np.ndarray) -> np.ndarray:
    """A user segmenter: connected components of dark haematoxylin."""
    from scipy import ndimage as ndi

    return ndi.label(haematoxylin(rgb) > 0.6)[0]


def _sparse_ids(rgb: np.ndarray) -> np.ndarray:
    """The same segmenter with huge, unsigned label ids."""
    return _threshold_labels(rgb).astype(np.uint64) * 1_000_003


def _wrong_shape(rgb: np.ndarray) -> np.ndarray:
    return np.zeros((rgb.shape[0] - 1, rgb.shape[1]), dtype=np.int32)


def test_tile_grid_partitions_the_image():
    tiles = tile_grid(100, 70, tile_size=32, overlap=8)
    owner = np.zeros((100, 70), dtype=int)
    yy, xx = np.mgrid[0:100, 0:70] + 0.5
    for t in tiles:
        owner += t.owns(yy, xx)
        assert t.y0 == max(t.core_y0 - 8, 0) and t.x1 == min(t.core_x1 + 8, 70)
    assert (owner == 1).all()
    with pytest.raises(ValueError, match="tile_size"):
        tile_grid(10, 10, tile_size=0, overlap=1)


def test_read_tile_is_the_window(synth):
    image = scale0(synth.images[f"{_sample(synth)}_image"])
    tile = tile_grid(SIZE, SIZE, tile_size=256, overlap=16)[4]
    rgb = read_tile(image, tile)
    assert rgb.shape == (*tile.shape, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, image.values[:, tile.y0 : tile.y1, tile.x0 : tile.x1].transpose(1, 2, 0))


@pytest.mark.parametrize("downsample", [1, 2])
def test_watershed_finds_the_true_nuclei(synth, downsample):
    s = _sample(synth)
    bt.pp.segment_nuclei(synth, tile_size=256, downsample=downsample)
    cells = synth.shapes[Key.cells(s)]
    precision, recall = _match(cells.geometry.values, synth.shapes[Key.true_nuclei(s)].geometry.values)
    print(f"downsample={downsample}: {len(cells)} cells, precision {precision:.3f}, recall {recall:.3f}")
    assert precision >= 0.9 and recall >= 0.9
    assert list(cells.index[:2]) == [f"{s}_0", f"{s}_1"] and cells.index.name == Key.CELL_ID
    assert cells.geometry.is_valid.all() and (cells.geom_type == "Polygon").all()
    px = bt.io.get_sections(synth)[0].pixel_size
    np.testing.assert_allclose(cells[Key.AREA_UM2], cells.area * px**2, rtol=0.25)
    assert cells[Key.AREA_UM2].between(10, 150).all()
    record = synth.attrs[Key.UNS][Key.SEGMENTATION][Key.cells(s)]
    assert record["sample"] == s and record["method"] == "watershed" and record["n_cells"] == len(cells) and record["downsample"] == downsample
    from spatialdata.transformations import get_transformation

    assert set(get_transformation(cells, get_all=True)) == {s, Key.microns(s)}


def test_seams_keep_each_nucleus_once(synth):
    s = _sample(synth)
    bt.pp.segment_nuclei(synth, tile_size=160, key_added="small_tiles")
    bt.pp.segment_nuclei(synth, tile_size=SIZE, key_added="one_tile")
    small, whole = synth.shapes["small_tiles"].geometry.values, synth.shapes["one_tile"].geometry.values
    tree = shapely.STRtree(small)
    a, b = tree.query(small, predicate="intersects")
    a, b = a[a != b], b[a != b]  # neighbours from one watershed share edges; a duplicate overlaps a lot
    shared = shapely.area(shapely.intersection(small[a], small[b])) / np.minimum(small[a].area, small[b].area)
    assert (shared < 0.05).all(), "two cells of the tiled run overlap: a nucleus on a seam was kept twice"
    precision, recall = _match(small, whole, min_iou=0.9)
    assert precision >= 0.97 and recall >= 0.97
    records = synth.attrs[Key.UNS][Key.SEGMENTATION]
    assert records["one_tile"]["shapes_key"] == "one_tile"  # one record per shapes element: both runs are kept
    assert records["small_tiles"]["tile_size"] == 160 and records["one_tile"]["sample"] == s


def test_serial_processes_and_dask_agree(synth):
    from dask.distributed import Client, LocalCluster, get_task_stream

    bt.pp.segment_nuclei(synth, tile_size=160, n_jobs=1, key_added="serial")
    bt.pp.segment_nuclei(synth, tile_size=160, n_jobs=2, key_added="processes")
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
        get_task_stream(client) as stream,
    ):
        bt.pp.segment_nuclei(synth, tile_size=160, client=client, key_added="dask")
        workers = set(client.nthreads())
    ran = [t for t in stream.data if t["key"].startswith("_segment_tile")]
    assert len(ran) == 16 and {t["worker"] for t in ran} <= workers  # every tile ran on a worker process
    serial = synth.shapes["serial"]
    assert len(serial) > 100
    for key in ("processes", "dask"):
        other = synth.shapes[key]
        assert list(other.index) == list(serial.index)
        np.testing.assert_array_equal(shapely.get_coordinates(other.geometry), shapely.get_coordinates(serial.geometry))
        np.testing.assert_array_equal(other[Key.AREA_UM2], serial[Key.AREA_UM2])
    assert synth.attrs[Key.UNS][Key.SEGMENTATION]["dask"]["shapes_key"] == "dask"


def test_callable_method(synth):
    s = _sample(synth)
    bt.pp.segment_nuclei(synth, method=_threshold_labels, tile_size=320)
    cells = synth.shapes[Key.cells(s)]
    precision, _ = _match(cells.geometry.values, synth.shapes[Key.true_nuclei(s)].geometry.values)
    assert len(cells) > 100 and precision > 0.5
    assert synth.attrs[Key.UNS][Key.SEGMENTATION][Key.cells(s)]["method"] == "_threshold_labels"
    bt.pp.segment_nuclei(synth, method=_sparse_ids, tile_size=320, key_added="sparse")
    np.testing.assert_allclose(synth.shapes["sparse"].area.to_numpy(), cells.area.to_numpy())


def test_callable_returning_the_wrong_shape(synth):
    with pytest.raises(ValueError, match=r"must return an integer label image of shape"):
        bt.pp.segment_nuclei(synth, method=_wrong_shape, tile_size=320)
    assert Key.cells(_sample(synth)) not in synth.shapes


def test_tissue_free_image_warns_and_writes_no_shapes(caplog_bitro):
    white = np.full((3, 300, 300), 250, dtype=np.uint8)
    sdata = section_sdata("blank", image_element(white, "blank", 0.5))
    with caplog_bitro.at_level(logging.WARNING, logger="bitro"):
        bt.pp.segment_nuclei(sdata, tile_size=128)
    assert "No tissue found" in caplog_bitro.text
    assert Key.cells("blank") not in sdata.shapes  # spatialdata refuses empty shapes elements
    record = sdata.attrs[Key.UNS][Key.SEGMENTATION][Key.cells("blank")]
    assert record["n_cells"] == 0 and record["shapes_key"] is None


def test_bad_input_is_refused_before_any_work(synth):
    before = set(synth.shapes)
    with pytest.raises(KeyError, match=r"'nope' not found\. Available: \['synth0_image'\]"):
        bt.pp.segment_nuclei(synth, image_key="nope")
    with pytest.raises(ValueError, match="method"):
        bt.pp.segment_nuclei(synth, method="cellpose")
    with pytest.raises(ValueError, match="overlap"):
        bt.pp.segment_nuclei(synth, overlap=10)
    with pytest.raises(ValueError, match="downsample"):
        bt.pp.segment_nuclei(synth, downsample=0)
    with pytest.raises(ValueError, match="max_area_um2"):
        bt.pp.segment_nuclei(synth, min_area_um2=50, max_area_um2=20)
    assert set(synth.shapes) == before and Key.SEGMENTATION not in synth.attrs.get(Key.UNS, {})


def test_key_added_needs_one_section():
    sdata = bt.datasets.synthetic(n_samples=2, size=128, seed=1)
    with pytest.raises(ValueError, match="image_key"):
        bt.pp.segment_nuclei(sdata, key_added="cells")


def test_real_her2st_crop(her2st_dir):
    from PIL import Image

    from bitro.io._lazy_image import allow_large_images

    with allow_large_images(), Image.open(her2st_dir / "C2.jpg") as im:
        crop = np.asarray(im.crop((5000, 5000, 5512, 5512)).convert("RGB"))
    sdata = section_sdata("C2", image_element(crop.transpose(2, 0, 1), "C2", 0.688))
    bt.pp.segment_nuclei(sdata, tile_size=256)
    cells = sdata.shapes["C2_cells"]
    # a dense tumour region: ~1 nucleus per 150-300 um^2 of the 124,000 um^2 crop
    assert 300 < len(cells) < 1500, len(cells)
    assert 15 < cells[Key.AREA_UM2].median() < 80


# --- load_segmentation ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["geojson", "hovernet", "cellvit", "shapes"])
def test_load_segmentation_formats(synth, tmp_path, fmt):
    s = _sample(synth)
    true = synth.shapes[Key.true_nuclei(s)]
    polygons = gpd.GeoDataFrame(geometry=true.geometry.values)
    if fmt == "geojson":
        source = tmp_path / "nuclei.geojson"
        polygons.to_file(source, driver="GeoJSON")
    elif fmt == "hovernet":
        source = tmp_path / "nuclei.json"
        contours = [shapely.get_coordinates(p.exterior).tolist() for p in polygons.geometry]
        nuc = {str(i + 1): {"contour": c} for i, c in enumerate(contours)}
        source.write_text(json.dumps({"mag": 40, "nuc": nuc}))
    elif fmt == "cellvit":
        source = tmp_path / "nuclei.parquet"
        polygons.to_parquet(source)
    else:
        source = Key.true_nuclei(s)
    bt.pp.load_segmentation(synth, source, format=fmt)
    cells = synth.shapes[Key.cells(s)]
    assert len(cells) == len(true)
    np.testing.assert_allclose(cells.area.to_numpy(), true.area.to_numpy(), rtol=1e-6)
    px = bt.io.get_sections(synth)[0].pixel_size
    np.testing.assert_allclose(cells[Key.AREA_UM2], true.area.to_numpy() * px**2, rtol=1e-6)
    expected_index = list(true.index.astype(str)) if fmt == "shapes" else [f"{s}_{i}" for i in range(len(true))]
    assert list(cells.index) == expected_index
    record = synth.attrs[Key.UNS][Key.SEGMENTATION][Key.cells(s)]
    assert record["method"] == fmt and record["source"] == str(source) and record["n_cells"] == len(true)


def test_load_shapes_in_another_unit_are_transformed(synth):
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Scale

    s = _sample(synth)
    true = synth.shapes[Key.true_nuclei(s)]
    px = bt.io.get_sections(synth)[0].pixel_size
    in_um = gpd.GeoDataFrame(geometry=true.geometry.scale(px, px, origin=(0, 0)))
    synth.shapes["nuclei_um"] = ShapesModel.parse(in_um, transformations={s: Scale([1 / px, 1 / px], axes=("x", "y"))})
    bt.pp.load_segmentation(synth, "nuclei_um", format="shapes")
    np.testing.assert_allclose(
        shapely.get_coordinates(synth.shapes[Key.cells(s)].geometry), shapely.get_coordinates(true.geometry), atol=1e-6
    )


def test_load_segmentation_bad_input(synth, tmp_path):
    from shapely import Point
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    s = _sample(synth)
    with pytest.raises(FileNotFoundError, match="missing.geojson"):
        bt.pp.load_segmentation(synth, tmp_path / "missing.geojson")
    with pytest.raises(ValueError, match="format"):
        bt.pp.load_segmentation(synth, "x", format="stardist")
    with pytest.raises(KeyError, match=r"'nope' not found\. Available: .*synth0_true_nuclei"):
        bt.pp.load_segmentation(synth, "nope", format="shapes")
    other = synth.shapes[Key.true_nuclei(s)].copy()
    elsewhere = gpd.GeoDataFrame(geometry=other.geometry)
    synth.shapes["elsewhere"] = ShapesModel.parse(elsewhere, transformations={"other": Identity()})
    with pytest.raises(ValueError, match=r"coordinate systems \['other'\].*'synth0'"):
        bt.pp.load_segmentation(synth, "elsewhere", format="shapes")
    points = tmp_path / "points.geojson"
    gpd.GeoDataFrame(geometry=[Point(1, 1), Point(2, 2)]).to_file(points, driver="GeoJSON")
    with pytest.raises(ValueError, match="not polygons"):
        bt.pp.load_segmentation(synth, points)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps({"nuc": {"1": {"contour": [[0, 0], [1, 1]]}}}))
    with pytest.raises(ValueError, match="valid 'contour'"):
        bt.pp.load_segmentation(synth, bad_json, format="hovernet")
    assert Key.cells(s) not in synth.shapes


def test_cells_and_record_survive_a_zarr_round_trip(synth, tmp_path):
    import spatialdata as sd

    s = _sample(synth)
    bt.pp.segment_nuclei(synth, tile_size=320)
    synth.write(tmp_path / "s.zarr")
    back = sd.read_zarr(tmp_path / "s.zarr")
    cells, cells_back = synth.shapes[Key.cells(s)], back.shapes[Key.cells(s)]
    assert list(cells_back.index) == list(cells.index)
    np.testing.assert_allclose(cells_back[Key.AREA_UM2], cells[Key.AREA_UM2])
    assert back.attrs[Key.UNS][Key.SEGMENTATION] == synth.attrs[Key.UNS][Key.SEGMENTATION]
