"""bt.tl.align_images, bt.tl.spot_image_features, bt.tl.region_classifier / evaluate_regions and bt.pl.regions.

Simulated spots of three sections: a region per spot, an expression embedding that shows the region, and image
features in which the region is a faint direction among many noisy ones. The tests fail when the classifier does
no better than the majority class, or when aligning the image features to the expression embedding does not
bring out the regions.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import bitro as bt
from bitro._constants import Key

pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

REGIONS = np.array(["tumour", "stroma", "immune"])


def toy_spots(n_per_section: int = 120, sections=("S1", "S2", "S3"), n_features: int = 40, seed: int = 0):
    world = np.random.default_rng(42)  # the same regions and image formation in every call
    centres, mixing = world.normal(size=(3, 6)) * 2, world.normal(size=(6, n_features)) * 0.5
    rng = np.random.default_rng(seed)
    n = n_per_section * len(sections)
    region = rng.choice(3, n, p=[0.5, 0.3, 0.2])
    latent = centres[region] + rng.normal(size=(n, 6)) * 0.5
    image = latent @ mixing + rng.normal(size=(n, n_features)) * 1.5
    obs = pd.DataFrame(
        {Key.SAMPLE: np.repeat(sections, n_per_section), "region": REGIONS[region]}, index=[f"s{i}" for i in range(n)]
    )
    a = ad.AnnData(obs=obs)
    a.obsm[Key.IMAGE_FEATURES] = image.astype(np.float32)
    a.obsm[Key.EXPRESSION_LATENT] = latent.astype(np.float32)
    grid = np.stack(np.meshgrid(np.arange(12), np.arange(10)), -1).reshape(-1, 2) * 100.0
    a.obsm[Key.SPATIAL] = np.tile(grid, (len(sections), 1))[:n]
    return a


@pytest.mark.parametrize("loss", ["clip", "bleep"])
def test_aligned_image_embedding_classifies_regions(loss):
    spots = toy_spots()
    before = spots.copy()
    aligner = bt.tl.align_images(spots, loss=loss, dim=32, epochs=15, batch_size=64)
    assert spots.obsm.keys() == before.obsm.keys()  # training writes nothing
    assert aligner.history[-1] < aligner.history[0]
    z = aligner.embed(spots)
    assert z.shape == (spots.n_obs, 32) and Key.IMAGE_EMBEDDING in spots.obsm
    res = bt.tl.evaluate_regions(spots, labels_key="region", use_rep=Key.IMAGE_EMBEDDING)
    folds = res["folds"]
    assert list(folds.index) == ["S1", "S2", "S3", "all"]
    assert (folds.loc[["S1", "S2", "S3"], "macro_f1"] > folds.loc[["S1", "S2", "S3"], "majority_macro_f1"] + 0.3).all()
    assert sorted(res["per_class"].index) == sorted(REGIONS)
    assert res["per_class"]["support"].sum() == spots.n_obs


def test_evaluate_regions_trains_the_alignment_inside_each_fold():
    spots = toy_spots(n_per_section=60)
    res = bt.tl.evaluate_regions(
        spots, labels_key="region", use_rep=Key.IMAGE_FEATURES, align={"dim": 16, "epochs": 5, "loss": "bleep"}
    )
    assert res["folds"].loc["all", "macro_f1"] > res["folds"]["majority_macro_f1"].max() + 0.2
    assert len(res["predictions"]) == spots.n_obs
    assert Key.IMAGE_EMBEDDING not in spots.obsm


def test_region_classifier_predicts_spots_of_an_unseen_section():
    train, new = toy_spots(sections=("S1", "S2")), toy_spots(n_per_section=50, sections=("S9",), seed=1)
    train.obs.loc[train.obs_names[::5], "region"] = np.nan  # unlabelled spots are left out
    clf = bt.tl.region_classifier(train, labels_key="region", use_rep=Key.IMAGE_FEATURES)
    assert sorted(clf.classes) == sorted(REGIONS)
    out = clf.predict(new)
    assert list(out.columns) == ["label", "probability", *clf.classes]
    assert new.obs[Key.REGION_PREDICTED].dtype == "category"
    assert ((new.obs[f"{Key.REGION_PREDICTED}_probability"] >= 1 / 3) & (out["probability"] <= 1)).all()
    assert (out["label"].astype(str) == new.obs["region"]).mean() > 0.6


def test_spot_image_features_pools_the_tokens_of_each_spot():
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    spots = ad.AnnData(obs=pd.DataFrame({Key.SAMPLE: "S1", Key.SPOT_ID: ["a", "b", "c"]}, index=["0", "1", "2"]))
    tokens = np.arange(2 * 4 * 3, dtype=np.float16).reshape(8, 3)  # spots b and a, 4 tokens (2 x 2) each
    patches = ad.AnnData(obs=pd.DataFrame({Key.SAMPLE: "S1", Key.SPOT_ID: list("bbbbaaaa")}, index=list("01234567")))
    patches.obsm[Key.PATCHES] = tokens
    patches.uns[Key.UNS] = {Key.SPOT_PATCHES: {"encoder": "efficientnet", "grid": 2}}
    sdata = SpatialData(tables={Key.SPOTS_TABLE: TableModel.parse(spots), Key.PATCHES_TABLE: TableModel.parse(patches)})
    out = bt.tl.spot_image_features(sdata)
    np.testing.assert_allclose(out[0], tokens[4:].astype(np.float32).mean(0))
    np.testing.assert_allclose(out[1], tokens[:4].astype(np.float32).mean(0))
    assert np.isnan(out[2]).all()  # no patch (outside="drop")
    sdata.tables[Key.PATCHES_TABLE].uns[Key.UNS][Key.SPOT_PATCHES]["encoder"] = "pixels"
    with pytest.raises(ValueError, match="encoder='efficientnet'"):
        bt.tl.spot_image_features(sdata)


def test_pl_regions_draws_labels_and_probability(tmp_path):
    import matplotlib.pyplot as plt

    spots = toy_spots(sections=("S1",))
    clf = bt.tl.region_classifier(spots, labels_key="region", use_rep=Key.IMAGE_FEATURES)
    clf.predict(spots)
    axs = bt.pl.regions(spots)
    assert len(axs) == 2 and axs[0].get_legend().get_title().get_text() == Key.REGION_PREDICTED
    fig = bt.pl.regions(spots, confidence=False, return_fig=True, save=tmp_path / "regions.png")
    assert len(fig.axes) == 1 and (tmp_path / "regions.png").is_file()
    with pytest.raises(KeyError, match="No regions in"):
        bt.pl.regions(spots, key="nope")
    plt.close("all")


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda a: bt.tl.align_images(a, loss="triplet"), ValueError, "`loss='triplet'`"),
        (lambda a: bt.tl.align_images(a, image_rep="X_none"), KeyError, "`image_rep='X_none'` is not in"),
        (lambda a: bt.tl.align_images(a, temperature=0), ValueError, "`temperature`"),
        (lambda a: bt.tl.region_classifier(a, labels_key="nope", use_rep=Key.IMAGE_FEATURES), KeyError, "columns"),
        (lambda a: bt.tl.region_classifier(a, labels_key="one", use_rep=Key.IMAGE_FEATURES), ValueError, "at least 2"),
        (lambda a: bt.tl.evaluate_regions(a, labels_key="region", groups_key="slide"), KeyError, "`groups_key"),
        (lambda a: bt.tl.evaluate_regions(a, labels_key="region", align="clip"), TypeError, "`align` must be a dict"),
    ],
)
def test_bad_input(call, exc, match):
    spots = toy_spots(n_per_section=20)
    spots.obs["one"] = "tumour"
    before = spots.copy()
    with pytest.raises(exc, match=match):
        call(spots)
    assert spots.obsm.keys() == before.obsm.keys() and spots.obs.equals(before.obs)


def test_nan_features_are_refused():
    spots = toy_spots(n_per_section=20)
    spots.obsm[Key.IMAGE_FEATURES][3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite values in 1 spots"):
        bt.tl.region_classifier(spots, labels_key="region", use_rep=Key.IMAGE_FEATURES)


# -- saving and loading (no pickle) --------------------------------------------------------------------------------
@pytest.mark.parametrize("sections", [("S1", "S2"), ("S1",)])
def test_region_classifier_round_trip_predicts_the_same(tmp_path, sections):
    import json

    spots = toy_spots(sections=sections)
    if len(sections) == 1:  # two regions: scikit-learn keeps one row of coefficients
        spots = spots[spots.obs["region"] != "immune"].copy()
    clf = bt.tl.region_classifier(spots, labels_key="region", use_rep=Key.IMAGE_FEATURES)
    folder = clf.save(tmp_path / "clf")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "weights.safetensors"]
    assert json.loads((folder / "config.json").read_text())["classes"] == clf.classes
    again = bt.tl.load_region_classifier(folder)
    assert again.classes == clf.classes and again.use_rep == clf.use_rep and again.n_features == clf.n_features
    new = toy_spots(n_per_section=50, sections=("S9",), seed=1)
    pd.testing.assert_frame_equal(clf.predict(new.copy()), again.predict(new))  # exactly, not approximately
    clf.save(folder)  # saving over a saved classifier replaces it
    assert bt.tl.load_region_classifier(folder).classes == clf.classes


def test_image_aligner_round_trip_embeds_the_same(tmp_path):
    spots = toy_spots(n_per_section=40)
    aligner = bt.tl.align_images(spots, loss="bleep", dim=16, epochs=3, batch_size=64)
    folder = aligner.save(tmp_path / "aligner")
    again = bt.tl.load_image_aligner(folder)
    assert again.config == aligner.config and again.history == pytest.approx(aligner.history)
    np.testing.assert_array_equal(again.embed(spots, key_added=None), aligner.embed(spots, key_added=None))
    for a, b in zip(again.gene_head.state_dict().values(), aligner.gene_head.state_dict().values(), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # the classifier of a saved pipeline (aligner + classifier) reads the reloaded aligner's embedding unchanged
    aligner.embed(spots)
    clf = bt.tl.region_classifier(spots, labels_key="region")
    clf.save(tmp_path / "clf")
    new = toy_spots(n_per_section=30, sections=("S9",), seed=2)
    again.embed(new)
    expected = clf.predict(new.copy(), key_added=None)
    pd.testing.assert_frame_equal(bt.tl.load_region_classifier(tmp_path / "clf").predict(new, key_added=None), expected)


def _flip_bytes(file, offset_from_end: int = 40) -> None:
    raw = bytearray(file.read_bytes())
    raw[-offset_from_end:] = bytes(b ^ 0xFF for b in raw[-offset_from_end:])
    file.write_bytes(bytes(raw))


@pytest.mark.parametrize("what", ["classifier", "aligner"])
def test_loading_bad_folders_fails_clearly(tmp_path, what):
    import json

    spots = toy_spots(n_per_section=30)
    if what == "classifier":
        obj = bt.tl.region_classifier(spots, labels_key="region", use_rep=Key.IMAGE_FEATURES)
        load, name = bt.tl.load_region_classifier, "region classifier"
    else:
        obj = bt.tl.align_images(spots, dim=8, epochs=1)
        load, name = bt.tl.load_image_aligner, "image aligner"
    with pytest.raises(FileNotFoundError, match="no folder there"):
        load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"not a saved {name}"):
        load(tmp_path / "empty")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        obj.save(tmp_path / "a_file")
    folder = obj.save(tmp_path / "saved")
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config[: len(config) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load(folder)
    (folder / "config.json").write_text(json.dumps({**json.loads(config), "format": "something else"}))
    with pytest.raises(ValueError, match=f"not the config of a bitro {name}"):
        load(folder)
    (folder / "config.json").write_text(config)
    weights = folder / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load(folder)
    # the other kind's folder is refused by its format
    other = (
        bt.tl.align_images(spots, dim=8, epochs=1)
        if what == "classifier"
        else bt.tl.region_classifier(spots, labels_key="region", use_rep=Key.IMAGE_FEATURES)
    )
    with pytest.raises(ValueError, match=f"not the config of a bitro {name}"):
        load(other.save(tmp_path / "other"))


def test_loaded_objects_refuse_other_features(tmp_path):
    spots = toy_spots(n_per_section=30)
    clf = bt.tl.load_region_classifier(
        bt.tl.region_classifier(spots, labels_key="region", use_rep=Key.IMAGE_FEATURES).save(tmp_path / "clf")
    )
    aligner = bt.tl.load_image_aligner(bt.tl.align_images(spots, dim=8, epochs=1).save(tmp_path / "aligner"))
    narrow = spots.copy()
    narrow.obsm[Key.IMAGE_FEATURES] = narrow.obsm[Key.IMAGE_FEATURES][:, :10]
    with pytest.raises(ValueError, match="has 10 features; the classifier was fitted on 40"):
        clf.predict(narrow)
    with pytest.raises(ValueError, match="has 10 features; the aligner was trained on 40"):
        aligner.embed(narrow)
    del narrow.obsm[Key.IMAGE_FEATURES]
    with pytest.raises(KeyError, match="is not in `adata.obsm`"):
        clf.predict(narrow)


def test_atlas_regions_from_the_pathologist_files(tmp_path):
    """``her2st_atlas(regions=True)`` reads ``pathologist/{S}.tsv``: rounded x, y name the spots; undetermined is NaN."""
    import gzip

    for sub in ("counts", "pathologist"):
        (tmp_path / sub).mkdir()
    for s in ("A1", "A2"):
        with gzip.open(tmp_path / "counts" / f"{s}.tsv.gz", "wt") as f:
            f.write("\tG1\tG2\n10x5\t1\t2\n11x5\t0\t3\n12x6\t4\t0\n")
    (tmp_path / "pathologist" / "A1.tsv").write_text(
        "Row.names\tx\ty\tpixel_x\tpixel_y\tlabel\n"
        "a\t10.02\t4.99\t1\t1\tinvasive cancer\n"
        "b\t11.1\t5.0\t1\t1\tundetermined\n"
        "c\t12\t6\t1\t1\tadipose tissue\n"
        "d\t\t\t1\t1\tadipose tissue\n"  # no coordinates: left out
        "e\t30\t30\t1\t1\tadipose tissue\n"  # no such spot
    )
    atlas = bt.datasets.her2st_atlas(path=tmp_path, regions=True)
    region = atlas.obs["region"]
    assert region.dtype == "category" and list(region.cat.categories) == ["adipose tissue", "invasive cancer"]
    assert region.astype(object).where(region.notna(), None).to_dict() == {
        "A1_10x5": "invasive cancer",
        "A1_11x5": None,
        "A1_12x6": "adipose tissue",
        "A2_10x5": None,
        "A2_11x5": None,
        "A2_12x6": None,
    }
    assert "region" not in bt.datasets.her2st_atlas(path=tmp_path).obs
    with pytest.raises(TypeError, match="`regions` must be True or False"):
        bt.datasets.her2st_atlas(path=tmp_path, regions="yes")


def test_imaged_sections_read_the_pathologist_regions(tmp_path, caplog_bitro):
    """``her2st(regions=True)`` reads ``pathologist/{S}.tsv`` beside the sections into ``.obs["region_pathologist"]``,
    for scoring regions from H&E against a pathologist (the full study through ``BITRO_HER2ST_DIR``)."""
    from bitro.datasets._her2st import BUNDLED_DIR

    for s in ("B4", "C2"):
        for suffix in (".jpg", ".tsv.gz", "_selection.tsv"):
            (tmp_path / f"{s}{suffix}").symlink_to(BUNDLED_DIR / f"{s}{suffix}")
    (tmp_path / "pathologist").mkdir()
    (tmp_path / "pathologist" / "B4.tsv").write_text(
        "Row.names\tx\ty\tpixel_x\tpixel_y\tlabel\n"
        "a\t9.03\t13.0\t1\t1\tbreast glands\n"
        "b\t8\t13\t1\t1\tundetermined\n"
        "c\t11\t14\t1\t1\tinvasive cancer\n"
    )
    spots = bt.datasets.her2st(path=tmp_path, regions=True)["spots"]
    region = spots.obs["region_pathologist"]
    assert region.dtype == "category" and list(region.cat.categories) == ["breast glands", "invasive cancer"]
    labelled = region.dropna().astype(str).to_dict()
    assert labelled == {"B4_9x13": "breast glands", "B4_11x14": "invasive cancer"}
    assert "No pathologist labels" in caplog_bitro.text and "C2" in caplog_bitro.text  # C2 has no file
    assert "region_pathologist" not in bt.datasets.her2st(["B4"], path=tmp_path)["spots"].obs
    with pytest.raises(TypeError, match="`regions` must be True or False"):
        bt.datasets.her2st(path=tmp_path, regions=1)
