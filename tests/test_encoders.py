from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from bitro.pp._encoders import HandcraftedEncoder, get_encoder, hed


@pytest.fixture(scope="module")
def crops():
    from skimage import data

    img = data.immunohistochemistry()  # a stained tissue image bundled with scikit-image
    return np.stack([img[y : y + 48, x : x + 48] for y in (0, 100, 200) for x in (0, 150)])


def test_hed_matches_skimage(crops):
    from skimage.color import rgb2hed

    np.testing.assert_allclose(hed(crops), np.moveaxis(rgb2hed(crops)[..., :2], 3, 1), atol=1e-5)


def test_handcrafted(crops):
    enc = get_encoder("handcrafted")
    out = enc(crops)
    assert out.shape == (6, enc.dim) and out.dtype == np.float32
    assert len(enc.feature_names()) == enc.dim
    assert np.isfinite(out).all()
    # a white crop: no stain, all background
    white = enc(np.full((1, 48, 48, 3), 255, np.uint8))[0]
    names = enc.feature_names()
    assert white[names.index("haematoxylin_mean")] == pytest.approx(0, abs=1e-6)
    assert white[names.index("background_fraction")] == 1
    assert isinstance(enc, HandcraftedEncoder)


def test_efficientnet_weights_classify_a_cat():
    """The bundled ImageNet weights load into the network correctly: scikit-image's cat is a cat."""
    import torch
    from skimage import data, transform

    from bitro.pp._encoders import efficientnet_lite0_classifier

    model = efficientnet_lite0_classifier()
    img = transform.resize(data.chelsea(), (224, 224), preserve_range=True).astype(np.uint8)
    x = (torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255 - 0.498) / 0.502
    with torch.inference_mode():
        top = int(model(x).argmax())
    assert 281 <= top <= 285  # the ImageNet cat classes


def test_efficientnet_encoder(crops):
    enc = get_encoder("efficientnet", device="cpu", batch_size=4)
    out = enc(crops)
    assert out.shape == (6, 1280)
    assert enc.name == "efficientnet_lite0"
    assert (out >= 0).all() and out.std(axis=0).max() > 0


def test_combined_encoder(crops):
    enc = get_encoder(["handcrafted", lambda c: np.ones((len(c), 2))])
    assert enc.dim == HandcraftedEncoder().dim + 2
    assert enc.name.startswith("handcrafted+callable:")
    out = enc(crops)
    np.testing.assert_array_equal(out[:, :-2], get_encoder("handcrafted")(crops))
    assert len(enc.feature_names()) == enc.dim
    with pytest.raises(ValueError, match="empty list"):
        get_encoder([])


def test_torch_module_encoder(crops):
    import torch

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.ReLU())  # feature maps: pooled
    enc = get_encoder(module, device="cpu")
    assert enc.dim == 5 and enc.name == "torch:Sequential"
    assert enc(crops).shape == (6, 5)


def test_callable_encoder(crops):
    enc = get_encoder(lambda c: c.reshape(len(c), -1, 3).mean(axis=1))
    assert enc.dim == 3
    np.testing.assert_allclose(enc(crops), crops.reshape(6, -1, 3).mean(axis=1), rtol=1e-6)


def test_callable_with_wrong_shape_fails_clearly():
    with pytest.raises(ValueError, match=r"expected shape \(2, d\)"):
        get_encoder(lambda c: np.zeros(len(c)))
    with pytest.raises(ValueError, match=r"expected shape \(2, d\)"):
        get_encoder(lambda c: np.zeros((1, 4)))


def test_callable_wrong_shape_through_extract_cells():
    from shapely.geometry import Point

    import bitro as bt
    from bitro.io._build import image_element, polygons_element, section_sdata

    calls = []

    def flaky(c):  # right shape on the probe, wrong afterwards
        calls.append(len(c))
        return np.zeros((len(c), 4 if len(calls) == 1 else 5))

    sdata = section_sdata("s0", image_element(np.full((3, 200, 200), 200, np.uint8), "s0", 0.5, scale_factors=[]))
    polys = [Point(20 + 15 * i, 100).buffer(4) for i in range(10)]
    sdata.shapes["s0_cells"] = polygons_element(polys, [f"c{i}" for i in range(10)], "s0", 0.5)
    with pytest.raises(ValueError, match=r"expected shape \(10, 4\)"):
        bt.pp.extract_cells(sdata, encoder=flaky)
    assert "cells" not in sdata.tables


def test_non_finite_features_fail_clearly():
    from shapely.geometry import Point

    import bitro as bt
    from bitro.io._build import image_element, polygons_element, section_sdata

    sdata = section_sdata("s0", image_element(np.full((3, 100, 100), 200, np.uint8), "s0", 0.5, scale_factors=[]))
    sdata.shapes["s0_cells"] = polygons_element([Point(50, 50).buffer(4)], ["c0"], "s0", 0.5)
    with pytest.raises(ValueError, match=r"1 cells have non-finite features \(e.g. \['c0'\]\)"):
        bt.pp.extract_cells(sdata, encoder=lambda c: np.full((len(c), 2), np.nan))
    assert "cells" not in sdata.tables


def test_bad_encoders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_encoder("timm:resnet18", weights=tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_encoder("efficientnet", weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="Unknown encoder 'resnet'"):
        get_encoder("resnet")
    with pytest.raises(ValueError, match="needs `weights=`"):
        get_encoder("timm:resnet18")
    with pytest.raises(TypeError, match="must be a name"):
        get_encoder(42)


def test_timm_missing_gives_import_error(tmp_path):
    try:
        import timm  # noqa: F401
    except ImportError:
        weights = tmp_path / "w.pth"
        weights.write_bytes(b"")
        with pytest.raises(ImportError, match="timm"):
            get_encoder("timm:resnet18", weights=weights)
    else:
        pytest.skip("timm is installed here")


def test_import_bitro_loads_no_torch():
    code = "import sys, bitro, bitro.pp; print([m for m in ('torch', 'torch_geometric', 'peft') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
