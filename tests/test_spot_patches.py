"""bt.pp.spot_patches: the patch table of the spot-patch models (layout, levels, padding, cache, records, bad input)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import bitro as bt
from bitro._constants import Key
from bitro._features import fingerprint
from bitro.pp import _patches

SAMPLE = "synth0"
CENTRE = 3  # the spot at (256, 256) of the 512 px synthetic section: its 112 um (224 px) patch lies inside


@pytest.fixture(scope="module")
def base():
    sdata = bt.datasets.synthetic(1, size=512, seed=0)
    xy = sdata.tables["spots"].obsm[Key.SPATIAL]
    assert tuple(xy[CENTRE]) == (256, 256) and tuple(xy[2]) == (56, 256)  # the spots the tests look at
    return sdata


@pytest.fixture
def sdata(base, tmp_path, monkeypatch):
    """A fresh copy of the synthetic section, with the cache in this test's own folder."""
    import spatialdata as sd

    monkeypatch.setattr(bt.settings, "cache_dir", tmp_path / "cache")
    return sd.deepcopy(base)


def _image(sdata) -> np.ndarray:
    return np.asarray(sdata.images[f"{SAMPLE}_image"].transpose("y", "x", "c").values)


def _levels_of(patches, spot: int, grid: int = 7, level_px=(224, 112, 56)) -> list[np.ndarray]:
    """Rebuild each level's patch of spot ``spot`` (in table order) from its token rows."""
    g2 = grid * grid
    rows = np.asarray(patches.obsm[Key.PATCHES][spot * g2 : (spot + 1) * g2])
    out, start = [], 0
    for p in level_px:
        b = p // grid
        blocks = rows[:, start : start + 3 * b * b].reshape(grid, grid, b, b, 3)
        out.append(blocks.transpose(0, 2, 1, 3, 4).reshape(p, p, 3))
        start += 3 * b * b
    return out


def _block_mean(x: np.ndarray, k: int) -> np.ndarray:
    p = x.shape[0]
    return x.astype(float).reshape(p // k, k, p // k, k, 3).mean(axis=(1, 3))


def test_pixel_table_contract(sdata):
    spots = sdata.tables["spots"]
    patches = bt.pp.spot_patches(sdata)
    n, g2 = spots.n_obs, 49
    assert sdata.tables[Key.PATCHES_TABLE] is patches
    assert patches.n_obs == n * g2
    feats = patches.obsm[Key.PATCHES]
    assert feats.dtype == np.uint8 and feats.shape == (n * g2, 3 * (32**2 + 16**2 + 8**2))
    # rows: spot-major in the spot table's order, tokens row-major
    assert patches.obs[Key.SAMPLE].dtype == "category"
    assert list(patches.obs[Key.SPOT_ID]) == list(np.repeat(spots.obs[Key.SPOT_ID].astype(str), g2))
    assert patches.obs[Key.TOKEN].tolist() == list(range(g2)) * n
    sid = spots.obs[Key.SPOT_ID].iloc[1]
    assert patches.obs_names[g2 + 10] == f"{SAMPLE}_{sid}_10"
    # 4-neighbour grid adjacency inside each spot, none across spots
    conn = patches.obsp[Key.CONNECTIVITIES]
    assert sp.issparse(conn) and conn.format == "csr" and conn.dtype == np.float32
    assert (conn != conn.T).nnz == 0 and conn.nnz == n * 2 * 2 * 7 * 6
    r, c = conn.nonzero()
    assert np.array_equal(r // g2, c // g2)
    dr, dc = np.abs(r % g2 // 7 - c % g2 // 7), np.abs(r % 7 - c % 7)
    assert np.all(dr + dc == 1)
    uns = patches.uns[Key.UNS]
    assert uns[Key.PIXEL_SIZE] == {SAMPLE: 0.5}
    assert uns[Key.SPOT_PATCHES]["image_key"] == {SAMPLE: f"{SAMPLE}_image"}
    assert uns[Key.SPOT_PATCHES]["n_spots"] == n


def test_token_positions_in_micrometres(sdata):
    spots = sdata.tables["spots"]
    patches = bt.pp.spot_patches(sdata, size_um=70.0, grid=7, patch_px=112, scales=2)
    ps, token_um = 0.5, 10.0
    centres = np.repeat(np.asarray(spots.obsm[Key.SPATIAL]) * ps, 49, axis=0)
    offsets = np.asarray(patches.obsm[Key.SPATIAL]) * ps - centres
    t = patches.obs[Key.TOKEN].to_numpy()
    expected = np.stack([(t % 7 - 3) * token_um, (t // 7 - 3) * token_um], 1)
    np.testing.assert_allclose(offsets, expected, atol=1e-9)


def test_same_fov_levels_are_downsamplings_of_one_patch(sdata):
    patches = bt.pp.spot_patches(sdata)
    l1, l2, l3 = _levels_of(patches, CENTRE)
    # at 0.5 um/px the 112 um field is 224 image pixels: level 1 is the image crop itself
    y0 = x0 = int(np.floor(256 - 112 + 0.5))
    np.testing.assert_array_equal(l1, _image(sdata)[y0 : y0 + 224, x0 : x0 + 224])
    assert np.abs(l2 - _block_mean(l1, 2)).max() <= 0.5 + 1e-9
    assert np.abs(l3.astype(float) - _block_mean(l1, 4)).max() <= 1.0
    # a token's block of level 2 is the area average of its level-1 block
    t, rows = 17, np.asarray(patches.obsm[Key.PATCHES][CENTRE * 49 + 17])
    b1 = rows[: 3 * 32 * 32].reshape(32, 32, 3)
    b2 = rows[3 * 32 * 32 : 3 * (32 * 32 + 16 * 16)].reshape(16, 16, 3)
    np.testing.assert_array_equal(b1, l1[(t // 7) * 32 : (t // 7 + 1) * 32, (t % 7) * 32 : (t % 7 + 1) * 32])
    assert np.abs(b2 - _block_mean(b1, 2)).max() <= 0.5 + 1e-9


def test_growing_fov_covers_a_larger_field(sdata):
    same = bt.pp.spot_patches(sdata, key_added="same")
    growing = bt.pp.spot_patches(sdata, fov="growing", key_added="growing")
    assert growing.obsm[Key.PATCHES].shape == same.obsm[Key.PATCHES].shape
    g1, g2, _ = _levels_of(growing, CENTRE)
    s1, s2, _ = _levels_of(same, CENTRE)
    np.testing.assert_array_equal(g1, s1)
    # level 2: 224 um = 448 image px around the centre, area-averaged to 112 px
    y0 = int(np.floor(256 - 224 + 0.5))
    crop = _image(sdata)[y0 : y0 + 448, y0 : y0 + 448]
    assert np.abs(g2 - _block_mean(crop, 4)).max() <= 0.5 + 1e-9
    assert np.abs(g2.astype(float) - s2).mean() > 1  # not the same field
    # level 3 (448 um = 896 px) reaches past the 512 px image: the padding of the largest field is recorded
    share = sdata.tables["spots"].obs[Key.PATCH_PADDING].to_numpy()
    assert share[CENTRE] == pytest.approx(1 - 512**2 / 896**2)
    assert growing.uns[Key.UNS][Key.SPOT_PATCHES]["field_um"] == [112.0, 224.0, 448.0]


def test_pad_records_padding_and_drop_leaves_spots_out(sdata, caplog_bitro):
    spots = sdata.tables["spots"]
    xy = np.asarray(spots.obsm[Key.SPATIAL])
    x0, y0 = np.floor(xy[:, 0] - 112 + 0.5), np.floor(xy[:, 1] - 112 + 0.5)
    inside = (np.clip(x0 + 224, 0, 512) - np.clip(x0, 0, 512)) * (np.clip(y0 + 224, 0, 512) - np.clip(y0, 0, 512))
    expected = 1 - inside / 224**2
    assert (expected > 0).sum() >= 2 and (expected == 0).sum() >= 1

    with caplog_bitro.at_level("WARNING", logger="bitro"):
        padded = bt.pp.spot_patches(sdata)
    warnings = [r for r in caplog_bitro.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"{int((expected > 0).sum())} of {len(xy)} spots" in warnings[0].getMessage()
    np.testing.assert_allclose(spots.obs[Key.PATCH_PADDING].to_numpy(), expected)
    assert padded.uns[Key.UNS][Key.SPOT_PATCHES]["n_padded"] == int((expected > 0).sum())
    # the outside is white: spot 2 sits at x = 56 px, so its patch starts 56 px left of the image
    l1 = _levels_of(padded, 2)[0]
    assert (l1[:, :56] == 255).all() and (l1[:, 56:] < 255).any()

    caplog_bitro.clear()
    with caplog_bitro.at_level("WARNING", logger="bitro"):
        dropped = bt.pp.spot_patches(sdata, outside="drop", key_added="dropped")
    warnings = [r for r in caplog_bitro.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "Left out" in warnings[0].getMessage()
    kept = spots.obs[Key.SPOT_ID].astype(str).to_numpy()[expected == 0]
    assert list(pd.unique(dropped.obs[Key.SPOT_ID])) == list(kept)
    assert dropped.n_obs == len(kept) * 49
    assert dropped.uns[Key.UNS][Key.SPOT_PATCHES]["n_dropped"] == int((expected > 0).sum())
    # the kept spots' tokens are those of the padded table
    rows = np.flatnonzero(padded.obs[Key.SPOT_ID].isin(kept).to_numpy())
    np.testing.assert_array_equal(dropped.obsm[Key.PATCHES], padded.obsm[Key.PATCHES][rows])
    np.testing.assert_allclose(dropped.obsm[Key.SPATIAL], padded.obsm[Key.SPATIAL][rows])


def test_cache_hit_does_not_recompute(sdata, tmp_path, monkeypatch):
    first = bt.pp.spot_patches(sdata)
    files = list((tmp_path / "cache" / _patches.CACHE_FOLDER).glob("*.npy"))
    assert len(files) == 1

    def fail(*args, **kwargs):
        raise AssertionError("recomputed despite the cache")

    with monkeypatch.context() as m:
        m.setattr(_patches, "_compute", fail)
        again = bt.pp.spot_patches(sdata)
        np.testing.assert_array_equal(again.obsm[Key.PATCHES], first.obsm[Key.PATCHES])
        with pytest.raises(AssertionError, match="recomputed"):
            bt.pp.spot_patches(sdata, cache=False)
        with pytest.raises(AssertionError, match="recomputed"):  # other settings: another key
            bt.pp.spot_patches(sdata, size_um=100.0)
    # the same spots on a changed image: another key
    img = sdata.images[f"{SAMPLE}_image"]
    sdata.images[f"{SAMPLE}_image"] = img.copy(data=(255 - img.data))
    with monkeypatch.context() as m:
        m.setattr(_patches, "_compute", fail)
        with pytest.raises(AssertionError, match="recomputed"):
            bt.pp.spot_patches(sdata)


def test_records_and_fingerprint(sdata):
    patches = bt.pp.spot_patches(sdata, scales=2, fov="growing", patch_px=112, grid=4)
    record = patches.uns[Key.UNS][Key.EXTRACT_CELLS]
    assert record["encoder"] == "pixels" and record["weights_sha256"] == ""
    assert record["crop_um"] == 112.0 and record["crop_px"] == 112 and record["add_morphology"] is False
    assert record["n_raw_features"] == patches.obsm[Key.PATCHES].shape[1] == 3 * (28**2 + 14**2)
    assert record["patch_layout"] == {
        "kind": "pixels",
        "grid": 4,
        "level_dims": [3 * 28**2, 3 * 14**2],
        "token_um": 28.0,
        "scales": 2,
        "fov": "growing",
        "patch_px": 112,
    }
    assert record["fingerprint"] == fingerprint(record)
    settings = patches.uns[Key.UNS][Key.SPOT_PATCHES]
    assert settings["table_key"] == "spots" and settings["outside"] == "pad" and settings["level_px"] == [112, 56]
    import json

    json.dumps(settings), json.dumps(record)  # plain values only
    other = bt.pp.spot_patches(sdata, key_added="other")
    assert other.uns[Key.UNS][Key.EXTRACT_CELLS]["fingerprint"] != record["fingerprint"]


def test_table_without_spot_ids_and_image_key_dict(sdata, tmp_path):
    spots = sdata.tables["spots"]
    few = spots[[CENTRE, 0]].copy()
    del few.obs[Key.SPOT_ID]  # a plain table: its row names are the ids
    few.uns.pop("spatialdata_attrs")
    sdata.tables["few"] = few
    patches = bt.pp.spot_patches(
        sdata, table_key="few", image_key={SAMPLE: f"{SAMPLE}_image"}, key_added="few_patches", scales=1
    )
    assert list(pd.unique(patches.obs[Key.SPOT_ID])) == list(few.obs_names)
    assert patches.obs_names[0] == f"{SAMPLE}_{few.obs_names[0]}_0"
    patches.write_h5ad(tmp_path / "patches.h5ad")  # the records are writable


def test_efficientnet_tokens(sdata, monkeypatch):
    import torch

    from bitro.pp._encoders import get_encoder

    torch.set_num_threads(2)
    few = sdata.tables["spots"][[CENTRE, 0, 5]].copy()
    sdata.tables["few"] = few
    tokens = bt.pp.spot_patches(sdata, table_key="few", encoder="efficientnet", key_added="tokens", batch_size=2)
    feats = tokens.obsm[Key.PATCHES]
    assert feats.dtype == np.float16 and feats.shape == (3 * 49, 3 * 1280)
    assert np.isfinite(feats.astype(np.float32)).all()
    record = tokens.uns[Key.UNS][Key.EXTRACT_CELLS]
    assert record["encoder"] == "efficientnet" and len(record["weights_sha256"]) == 64
    assert record["n_raw_features"] == 3840
    assert record["patch_layout"]["kind"] == "tokens" and record["patch_layout"]["level_dims"] == [1280] * 3
    # the mean of a spot's level-1 tokens is the encoder's global average of its level-1 patch
    pixels = bt.pp.spot_patches(sdata, table_key="few", key_added="pixels")
    level1 = np.stack([_levels_of(pixels, i)[0] for i in range(3)])
    pooled = get_encoder("efficientnet", device="cpu")(level1)
    mean_tokens = feats[:, :1280].astype(np.float32).reshape(3, 49, 1280).mean(axis=1)
    np.testing.assert_allclose(mean_tokens, pooled, atol=2e-2, rtol=1e-2)
    # cached: the encoder is not run again
    calls = []
    monkeypatch.setattr(_patches._EfficientNetTokens, "__call__", lambda self, levels: calls.append(1))
    again = bt.pp.spot_patches(sdata, table_key="few", encoder="efficientnet", key_added="tokens")
    assert not calls
    np.testing.assert_array_equal(again.obsm[Key.PATCHES], feats)


def _drop_spatial(s):
    del s.tables["spots"].obsm[Key.SPATIAL]


def _rename_sample(s):
    s.tables["spots"].obs[Key.SAMPLE] = "elsewhere"


def _no_pixel_size(s):
    from spatialdata.transformations import remove_transformation

    remove_transformation(s.images[f"{SAMPLE}_image"], f"{SAMPLE}_um")


@pytest.mark.parametrize(
    ("prepare", "kwargs", "error", "match"),
    [
        (None, {"table_key": "nope"}, KeyError, "No spot table 'nope'"),
        (_drop_spatial, {}, KeyError, r"no `.obsm\['spatial'\]`"),
        (_rename_sample, {}, ValueError, r"No image for the samples \['elsewhere'\]"),
        (_no_pixel_size, {}, ValueError, "pixel size is unknown"),
        (None, {"grid": 5}, ValueError, "multiple of grid"),
        (None, {"patch_px": 200, "grid": 7, "scales": 1}, ValueError, r"patch_px in \[196, 203\]"),
        (None, {"encoder": "resnet"}, ValueError, "Unknown `encoder`"),
        (None, {"fov": "wide"}, ValueError, "Unknown `fov`"),
        (None, {"outside": "clip"}, ValueError, "Unknown `outside`"),
        (None, {"size_um": 0}, ValueError, "size_um"),
        (None, {"size_um": -10.0}, ValueError, "size_um"),
        (None, {"scales": 0}, ValueError, "scales"),
        (None, {"key_added": "spots"}, ValueError, "replace the spot table"),
        (None, {"image_key": "missing_image"}, KeyError, "missing_image"),
    ],
)
def test_bad_input_fails_first_and_leaves_data_as_it_was(sdata, prepare, kwargs, error, match):
    if prepare is not None:
        prepare(sdata)
    before = {k: (t.obs.copy(), sorted(t.obsm), sorted(t.uns)) for k, t in sdata.tables.items()}
    with pytest.raises(error, match=match):
        bt.pp.spot_patches(sdata, **kwargs)
    assert sorted(sdata.tables) == sorted(before)
    for k, (obs, obsm, uns) in before.items():
        pd.testing.assert_frame_equal(sdata.tables[k].obs, obs)
        assert sorted(sdata.tables[k].obsm) == obsm and sorted(sdata.tables[k].uns) == uns


def test_not_a_spatialdata():
    with pytest.raises(TypeError, match="SpatialData"):
        bt.pp.spot_patches(bt.datasets.synthetic(1, size=256).tables["spots"])
