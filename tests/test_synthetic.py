from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import shapely

import bitro as bt
from bitro import Key

SIZE = 640  # 320 um at 0.5 um/px: ~20 spots and ~1000 cells per section


@pytest.fixture(scope="session")
def sdata():
    return bt.datasets.synthetic(2, size=SIZE, bulk=True, seed=1)


def _image(sdata, sample: str) -> np.ndarray:
    from bitro._utils import scale0

    return np.moveaxis(scale0(sdata.images[Key.image(sample)]).values, 0, -1)


def _masks(sdata, sample: str) -> np.ndarray:
    """Label image of the true nuclei, rasterised by pixel centres (the documented convention)."""
    from skimage.draw import polygon

    labels = np.zeros((SIZE, SIZE), dtype=np.int32)
    for i, geom in enumerate(sdata[Key.true_nuclei(sample)].geometry):
        xy = shapely.get_coordinates(geom)
        rr, cc = polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, labels.shape)
        labels[rr, cc] = i + 1
    return labels


def _cells_in_spots(sdata, sample: str) -> tuple[np.ndarray, np.ndarray]:
    """Spot index of every true cell of ``sample`` (-1: in no spot), from the stored geometry."""
    spots = sdata[Key.spots(sample)]
    truth = sdata[Key.TRUTH_TABLE]
    xy = truth.obsm[Key.SPATIAL][(truth.obs[Key.SAMPLE] == sample).to_numpy()]
    centres = np.c_[spots.geometry.x, spots.geometry.y]
    d = np.linalg.norm(xy[:, None, :] - centres[None, :, :], axis=-1)
    inside = d <= spots["radius"].to_numpy()[None, :]
    assert inside.sum(axis=1).max() <= 1  # spots do not overlap
    return np.where(inside.any(axis=1), inside.argmax(axis=1), -1), spots.index.to_numpy()


def test_layout(sdata):
    from bitro._utils import pixel_size
    from bitro.io import get_sections

    samples = ["synth0", "synth1"]
    assert set(sdata.images) == {Key.image(s) for s in samples}
    assert set(sdata.shapes) == {Key.spots(s) for s in samples} | {Key.true_nuclei(s) for s in samples}
    assert set(sdata.tables) == {Key.SPOTS_TABLE, Key.TRUTH_TABLE, Key.BULK_TABLE}
    for s in samples:
        image = _image(sdata, s)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        assert set(sdata.coordinate_systems) >= {s, Key.microns(s)}
        assert pixel_size(sdata, Key.image(s)) == pytest.approx(0.5)
        nuclei = sdata[Key.true_nuclei(s)]
        assert nuclei.geometry.geom_type.eq("Polygon").all() and nuclei.geometry.is_valid.all()
        assert isinstance(nuclei[Key.CELL_TYPE].dtype, pd.CategoricalDtype)
    assert [sec.sample for sec in get_sections(sdata)] == samples
    assert [sec.spots_key for sec in get_sections(sdata)] == [Key.spots(s) for s in samples]

    spots = sdata[Key.SPOTS_TABLE]
    assert spots.var_names[0] == "GENE00" and spots.n_vars == 60
    assert spots.obsm[Key.SPATIAL].shape == (spots.n_obs, 2)
    assert {Key.SAMPLE, Key.ARRAY_ROW, Key.ARRAY_COL, Key.REGION, Key.SPOT_ID} <= set(spots.obs)
    counts = spots.X.toarray()
    assert (counts >= 0).all() and np.array_equal(counts, np.round(counts))

    truth = sdata[Key.TRUTH_TABLE]
    attrs = truth.uns["spatialdata_attrs"]
    assert attrs["region"] == [Key.true_nuclei(s) for s in samples]
    assert (attrs["region_key"], attrs["instance_key"]) == (Key.REGION, Key.CELL_ID)
    assert list(truth.obs[Key.CELL_TYPE].cat.categories) == ["epithelial", "lymphocyte", "fibroblast", "macrophage"]
    assert truth.obsm[Key.SPATIAL].shape == (truth.n_obs, 2)
    params = truth.uns[Key.UNS][Key.SYNTHETIC]
    assert params["seed"] == 1 and params["size"] == SIZE
    assert params["profiles"].shape == (4, 60)
    for s in samples:
        # the truth rows of a section are its nuclei, in the same order and with the same types
        rows = truth.obs[Key.SAMPLE] == s
        nuclei = sdata[Key.true_nuclei(s)]
        assert list(truth.obs.loc[rows, Key.CELL_ID]) == list(nuclei.index)
        assert list(truth.obs.loc[rows, Key.CELL_TYPE]) == list(nuclei[Key.CELL_TYPE])
        centroids = shapely.get_coordinates(nuclei.geometry.centroid)
        np.testing.assert_allclose(truth.obsm[Key.SPATIAL][rows.to_numpy()], centroids, atol=1e-6)

    bulk = sdata[Key.BULK_TABLE]
    assert list(bulk.obs[Key.SAMPLE]) == samples and bulk.n_vars == 60


def test_nuclei_do_not_overlap_and_match_the_image(sdata):
    from skimage.color import rgb2hed

    s = "synth0"
    polygons = sdata[Key.true_nuclei(s)].geometry.to_numpy()
    left, right = shapely.STRtree(polygons).query(polygons, predicate="intersects")
    assert (left == right).all()
    labels = _masks(sdata, s)
    assert len(np.unique(labels)) - 1 == len(polygons)  # every nucleus covers pixels
    haematoxylin = rgb2hed(_image(sdata, s))[..., 0]
    assert np.median(haematoxylin[labels > 0]) > 3 * np.median(haematoxylin[labels == 0])


def test_nuclei_are_separable_by_a_threshold(sdata):
    """Colour deconvolution + Otsu + connected components already finds nearly every nucleus (IoU > 0.5)."""
    from scipy import ndimage
    from skimage.color import rgb2hed
    from skimage.filters import gaussian, threshold_otsu

    s = "synth1"
    truth = _masks(sdata, s)
    h = gaussian(rgb2hed(_image(sdata, s))[..., 0], 1)
    found, n_found = ndimage.label(ndimage.binary_fill_holes(h > threshold_otsu(h)))
    both = (truth > 0) & (found > 0)
    pairs, overlap = np.unique(np.c_[truth[both], found[both]], axis=0, return_counts=True)
    union = np.bincount(truth.ravel())[pairs[:, 0]] + np.bincount(found.ravel())[pairs[:, 1]] - overlap
    matched = (overlap / union > 0.5).sum()
    assert matched / truth.max() > 0.9
    assert matched / n_found > 0.9


def test_cell_types_differ_as_designed(sdata):
    from skimage.color import rgb2hed

    s = "synth0"
    nuclei = sdata[Key.true_nuclei(s)]
    labels = _masks(sdata, s)
    haematoxylin = rgb2hed(_image(sdata, s))[..., 0]
    mean_h = np.bincount(labels.ravel(), weights=haematoxylin.ravel())[1:] / np.bincount(labels.ravel())[1:]
    corners = shapely.get_coordinates(nuclei.geometry.minimum_rotated_rectangle()).reshape(-1, 5, 2)
    sides = np.linalg.norm(np.diff(corners[:, :3], axis=1), axis=-1)
    table = pd.DataFrame(
        {"area": nuclei.geometry.area, "h": mean_h, "elongation": sides.max(axis=1) / sides.min(axis=1)},
        index=nuclei.index,
    ).groupby(nuclei[Key.CELL_TYPE], observed=True).median()
    assert table.loc["lymphocyte", "area"] < table.loc["macrophage", "area"] < table.loc["epithelial", "area"]
    assert table["elongation"].idxmax() == "fibroblast" and table.loc["fibroblast", "elongation"] > 2.5
    assert table["h"].idxmax() == "lymphocyte" and table["h"].idxmin() == "macrophage"


def test_spot_counts_follow_the_true_cells(sdata):
    truth = sdata[Key.TRUTH_TABLE]
    spots = sdata[Key.SPOTS_TABLE]
    for s in ["synth0", "synth1"]:
        spot_of_cell, spot_ids = _cells_in_spots(sdata, s)
        expected = np.zeros((len(spot_ids), truth.n_vars))
        inside = spot_of_cell >= 0
        np.add.at(expected, spot_of_cell[inside], truth.X[(truth.obs[Key.SAMPLE] == s).to_numpy()][inside])
        counts = spots[spots.obs[Key.SAMPLE] == s][:, truth.var_names]
        counts = counts[[f"{s}_{i}" for i in spot_ids]].X.toarray()
        assert np.corrcoef(np.log1p(expected).ravel(), np.log1p(counts).ravel())[0, 1] > 0.9
        # the ambient term is small: counts are the true sum up to Poisson noise and a few percent
        assert counts.sum() / expected.sum() == pytest.approx(1.05, rel=0.03)
        # spots differ in composition (niches), so per-gene spot totals vary
        assert np.median(counts.std(axis=0) / counts.mean(axis=0)) > 0.3
    bulk = sdata[Key.BULK_TABLE].X.toarray()
    totals = np.vstack([truth.X[(truth.obs[Key.SAMPLE] == s).to_numpy()].sum(axis=0) for s in ["synth0", "synth1"]])
    np.testing.assert_allclose(bulk.sum(axis=1), totals.sum(axis=1), rtol=0.02)


def test_marker_genes_mark_their_type(sdata):
    truth = sdata[Key.TRUTH_TABLE]
    means = pd.DataFrame(truth.X, columns=truth.var_names).groupby(truth.obs[Key.CELL_TYPE].to_numpy()).mean()
    for gene, cell_type in truth.var["marker_of"].dropna().items():
        assert means[gene].idxmax() == cell_type
    assert truth.var["marker_of"].value_counts().eq(5).all()


def test_deterministic():
    a = bt.datasets.synthetic(1, size=300, seed=3, bulk=True)
    b = bt.datasets.synthetic(2, size=300, seed=3, bulk=True)
    c = bt.datasets.synthetic(1, size=300, seed=4)
    np.testing.assert_array_equal(_image(a, "synth0"), _image(b, "synth0"))
    assert not np.array_equal(_image(a, "synth0"), _image(c, "synth0"))
    spots_b = b[Key.SPOTS_TABLE][b[Key.SPOTS_TABLE].obs[Key.SAMPLE] == "synth0"]
    np.testing.assert_array_equal(a[Key.SPOTS_TABLE].X.toarray(), spots_b.X.toarray())
    np.testing.assert_array_equal(a[Key.BULK_TABLE].X.toarray(), b[Key.BULK_TABLE].X.toarray()[:1])
    nuclei = Key.true_nuclei("synth0")
    assert a[nuclei].geometry.geom_equals(b[nuclei].geometry).all()


def test_round_trip(tmp_path):
    from spatialdata import read_zarr

    sdata = bt.datasets.synthetic(1, size=200, n_genes=8, n_markers=2)
    sdata.write(tmp_path / "synthetic.zarr")
    back = read_zarr(tmp_path / "synthetic.zarr")
    np.testing.assert_array_equal(back[Key.SPOTS_TABLE].X.toarray(), sdata[Key.SPOTS_TABLE].X.toarray())
    params, params_back = (d[Key.TRUTH_TABLE].uns[Key.UNS][Key.SYNTHETIC] for d in (sdata, back))
    np.testing.assert_array_equal(params_back["profiles"], params["profiles"])
    pd.testing.assert_frame_equal(params_back["morphology"], params["morphology"], check_index_type=False)
    nuclei = Key.true_nuclei("synth0")
    assert list(back[nuclei][Key.CELL_TYPE]) == list(sdata[nuclei][Key.CELL_TYPE])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_samples": 0}, "n_samples"),
        ({"n_cell_types": 0}, "n_cell_types"),
        ({"n_cell_types": 7}, "n_cell_types"),
        ({"size": 100}, "too small to hold one spot"),
        ({"pixel_size": 0}, "pixel_size"),
        ({"pixel_size": 2.0}, "pixel_size"),
        ({"spot_pitch_um": 50.0}, "must not overlap"),
        ({"spot_diameter_um": -1.0}, "spot_diameter_um"),
        ({"n_genes": 10}, "marker genes"),
        ({"tissue_fraction": 0.0}, "tissue_fraction"),
        ({"counts_per_cell": 0.0}, "counts_per_cell"),
        ({"ambient": -0.1}, "ambient"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bt.datasets.synthetic(**{"n_samples": 1, **kwargs})


def test_more_cell_types_and_micrometre_sizes():
    sdata = bt.datasets.synthetic(1, size=400, pixel_size=0.25, n_cell_types=6, n_genes=30, spot_diameter_um=40.0)
    truth = sdata[Key.TRUTH_TABLE]
    assert len(truth.obs[Key.CELL_TYPE].cat.categories) == 6
    # 400 px at 0.25 um/px = 100 um: a 40 um spot has a 80 px radius
    assert sdata[Key.spots("synth0")]["radius"].iloc[0] == pytest.approx(80.0)
    areas = sdata[Key.true_nuclei("synth0")].geometry.area.groupby(truth.obs[Key.CELL_TYPE].to_numpy()).median()
    assert areas["lymphocyte"] * 0.25**2 == pytest.approx(np.pi * 2.7 * 2.5, rel=0.3)  # in um^2
