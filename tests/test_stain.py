from __future__ import annotations

import numpy as np
import pytest

import bitro as bt
from bitro._constants import Key
from bitro._utils import scale0
from bitro.io._build import image_element

SIZE = 512


def _tint(rgb: np.ndarray) -> np.ndarray:
    """Another lab's H&E: the same tissue with its optical densities mixed by a different stain matrix."""
    od = -np.log(np.maximum(rgb.astype(float), 1) / 255)  # (c, y, x)
    mix = np.array([[0.75, 0.25, 0.05], [0.1, 1.1, 0.0], [0.0, 0.35, 0.85]])
    return (255 * np.exp(-np.einsum("ij,jyx->iyx", mix, od))).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def _pair():
    """One synthetic section and the same tissue with different stain colours, as a second section."""
    sdata = bt.datasets.synthetic(n_samples=1, size=SIZE, seed=5)
    rgb = scale0(sdata.images["synth0_image"]).values
    px = bt.io.get_sections(sdata)[0].pixel_size
    sdata.images["tinted_image"] = image_element(_tint(rgb), "tinted", px, scale_factors=[2])
    return sdata


@pytest.fixture
def pair(_pair):
    from spatialdata import SpatialData

    return SpatialData(images=dict(_pair.images))


def _tissue_colour(rgb: np.ndarray) -> np.ndarray:
    """Mean colour (c,) of the pixels that are not background."""
    tissue = rgb.astype(float).mean(axis=0) < 220
    return rgb[:, tissue].mean(axis=1)


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_normalize_moves_colours_to_the_reference(pair, method):
    bt.pp.normalize_stain(pair, method=method, reference="synth0_image", image_key="tinted_image")
    reference = scale0(pair.images["synth0_image"]).values
    before = scale0(pair.images["tinted_image"]).values
    after_element = pair.images[Key.normalized("tinted_image")]
    after = scale0(after_element).values
    assert after.dtype == np.uint8 and after.shape == before.shape
    gap_before = np.abs(_tissue_colour(before) - _tissue_colour(reference)).sum()
    gap_after = np.abs(_tissue_colour(after) - _tissue_colour(reference)).sum()
    print(f"{method}: mean tissue colour gap to the reference {gap_before:.1f} -> {gap_after:.1f}")
    assert gap_after < 0.5 * gap_before

    from spatialdata.transformations import get_transformation

    source = pair.images["tinted_image"]
    assert get_transformation(after_element, get_all=True).keys() == get_transformation(source, get_all=True).keys()
    assert list(after_element.keys()) == list(source.keys())  # same pyramid
    assert scale0(after_element).data.chunksize == scale0(source).data.chunksize
    record = pair.attrs[Key.UNS][Key.NORMALIZE_STAIN][Key.normalized("tinted_image")]
    assert record["image_key"] == "tinted_image" and record["method"] == method and record["reference"] == "synth0_image"
    assert np.asarray(record["reference_stain_matrix"]).shape == (3, 3)
    assert {Key.tissue("tinted_image"), Key.tissue("synth0_image")} <= set(pair.labels)


def test_default_normalises_every_section_to_the_first(pair):
    bt.pp.normalize_stain(pair)
    assert Key.normalized("synth0_image") in pair.images
    assert pair.attrs[Key.UNS][Key.NORMALIZE_STAIN][Key.normalized("synth0_image")]["reference"] == "synth0_image"
    # normalising an image to itself changes little
    after = scale0(pair.images[Key.normalized("synth0_image")]).values.astype(int)
    diff = np.abs(after - scale0(pair.images["synth0_image"]).values)
    assert diff.mean() < 3


def test_segment_the_normalised_images(pair):
    bt.pp.normalize_stain(pair)
    normalized = {"synth0": Key.normalized("synth0_image"), "tinted": Key.normalized("tinted_image")}
    bt.pp.segment_nuclei(pair, image_key=normalized, tile_size=256)
    records = pair.attrs[Key.UNS][Key.SEGMENTATION]
    assert {r["sample"]: r["image_key"] for r in records.values()} == normalized
    # the same tissue in two stain colours gives about the same nuclei once normalised
    n0, n1 = len(pair.shapes[Key.cells("synth0")]), len(pair.shapes[Key.cells("tinted")])
    assert abs(n0 - n1) < 0.1 * n0


def test_a_fitted_reference_can_be_reused(pair):
    import squidpy.experimental.im as sqi

    bt.pp.normalize_stain(pair, image_key="synth0_image", key_added="self")
    reference = sqi.fit_stain_reference(pair, "synth0_image", tissue_mask_key=Key.tissue("synth0_image"))
    bt.pp.normalize_stain(pair, reference=reference, image_key="tinted_image")
    records = pair.attrs[Key.UNS][Key.NORMALIZE_STAIN]
    assert records[Key.normalized("tinted_image")]["reference"] is None
    assert "self" in pair.images and records["self"]["image_key"] == "synth0_image"  # one record per written image


def test_bad_input_leaves_sdata_untouched(pair):
    import squidpy.experimental.im as sqi

    images, labels = set(pair.images), set(pair.labels)
    with pytest.raises(ValueError, match="method"):
        bt.pp.normalize_stain(pair, method="reinhard")
    with pytest.raises(KeyError, match=r"Reference image 'nope' not found\. Available: \['synth0_image', 'tinted"):
        bt.pp.normalize_stain(pair, reference="nope")
    with pytest.raises(KeyError, match=r"Image 'nope' not found"):
        bt.pp.normalize_stain(pair, image_key="nope")
    with pytest.raises(TypeError, match="reference"):
        bt.pp.normalize_stain(pair, reference=3)
    with pytest.raises(ValueError, match="key_added"):
        bt.pp.normalize_stain(pair, key_added="normalised")
    fitted = sqi.StainReference(method="vahadane", stain_matrix=np.eye(3), white_point=np.full(3, 255.0))
    with pytest.raises(ValueError, match="vahadane"):
        bt.pp.normalize_stain(pair, reference=fitted, method="macenko")
    blank = np.full((3, 128, 128), 250, dtype=np.uint8)
    pair.images["blank_image"] = image_element(blank, "blank", 0.5)
    images.add("blank_image")
    with pytest.raises(Exception, match="(?i)tissue|stain"):
        bt.pp.normalize_stain(pair, reference="blank_image", image_key="synth0_image")
    assert set(pair.images) == images and set(pair.labels) == labels
    assert Key.NORMALIZE_STAIN not in pair.attrs.get(Key.UNS, {})


def test_stain_fit_falls_back_to_a_finer_level(pair, caplog):
    """A coarsest level whose colours give no stain vectors (here: grey, as haematoxylin and eosin mix at a whole
    slide's thumbnail): the fit is repeated one level finer, and gives the same normalised image as an image whose
    pyramid ends at that level."""
    import xarray as xr
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    image = pair.images["tinted_image"]
    levels = list(image.keys())
    coarse = next(iter(image[levels[-1]].values()))
    grey = coarse.astype(float).mean("c").astype(np.uint8).broadcast_like(coarse).transpose("c", "y", "x")
    greyed = xr.DataTree.from_dict(
        {**{name: image[name].ds for name in levels[:-1]}, levels[-1]: grey.to_dataset(name=coarse.name)}
    )
    cut = xr.DataTree.from_dict({name: image[name].ds for name in levels[:-1]})
    ref = pair.images["synth0_image"]
    with pytest.raises(ValueError, match="No haematoxylin and eosin"):  # the grey level alone fails
        bt.pp.normalize_stain(
            SpatialData(images={"synth0_image": ref, "grey": Image2DModel.parse(grey.data, dims=("c", "y", "x"))}),
            reference="synth0_image",
            image_key="grey",
        )
    greyed_sdata = SpatialData(images={"synth0_image": ref, "tinted_image": greyed})
    with caplog.at_level("INFO", logger="bitro"):
        bt.pp.normalize_stain(greyed_sdata, reference="synth0_image", image_key="tinted_image")
    assert "fitted on pyramid level scale0" in caplog.text
    # the same fit on a pyramid that ends one level finer, with the same tissue mask
    mask = Key.tissue("tinted_image")
    cut_sdata = SpatialData(
        images={"synth0_image": ref, "tinted_image": cut},
        labels={
            mask: greyed_sdata.labels[mask],
            Key.tissue("synth0_image"): greyed_sdata.labels[Key.tissue("synth0_image")],
        },
    )
    bt.pp.normalize_stain(cut_sdata, reference="synth0_image", image_key="tinted_image")
    np.testing.assert_array_equal(
        scale0(greyed_sdata.images["tinted_image_normalized"]).values,
        scale0(cut_sdata.images["tinted_image_normalized"]).values,
    )
