"""The command line end to end: read -> cells -> fit -> predict on a new slide, and ``bitro predict`` on an image alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bitro._cli import main

#: The pixel size of the HER2ST images, as read_st measures it from the spot grid (0.687-0.688 um/px).
HER2ST_PIXEL_SIZE = 0.6878
GENES = ["ERBB2", "EPCAM", "KRT19", "KRT8", "CD74", "COL1A1", "FN1", "MGP", "SCGB2A2", "IGKC", "ACTB", "B2M"]


def crop_section(src: Path, dst: Path, sample: str, size: int = 2000) -> Path:
    """A legacy ST section cut to a ``size`` x ``size`` window around its spots' centre (and a few genes)."""
    from PIL import Image

    from bitro.io._lazy_image import allow_large_images

    dst.mkdir(parents=True, exist_ok=True)
    coords = pd.read_csv(src / f"{sample}_selection.tsv", sep="\t")
    cx, cy = coords["pixel_x"].median(), coords["pixel_y"].median()
    x0, y0 = int(cx - size / 2), int(cy - size / 2)
    with allow_large_images(), Image.open(src / f"{sample}.jpg") as im:
        im.crop((x0, y0, x0 + size, y0 + size)).save(dst / f"{sample}.jpg", quality=90)
    margin = 80  # a spot radius (~72 px) inside the window
    inside = coords["pixel_x"].between(x0 + margin, x0 + size - margin) & coords["pixel_y"].between(
        y0 + margin, y0 + size - margin
    )
    coords = coords[inside].copy()
    coords["pixel_x"] -= x0
    coords["pixel_y"] -= y0
    coords.to_csv(dst / f"{sample}_selection.tsv", sep="\t", index=False)
    counts = pd.read_csv(src / f"{sample}.tsv.gz", sep="\t", index_col=0)
    ids = coords["x"].astype(int).astype(str) + "x" + coords["y"].astype(int).astype(str)
    top = counts.sum().sort_values(ascending=False).index[:300]
    keep = counts.loc[counts.index.intersection(ids), list(dict.fromkeys([*GENES, *top]))]
    keep.to_csv(dst / f"{sample}.tsv.gz", sep="\t")
    return dst


def tiny_jpeg(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 230, np.uint8)).save(path)
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any model is loaded or any image read: the command must stop before that."""
    import bitro as bt

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(bt.tl, "load_model", forbidden)
    monkeypatch.setattr(bt.io, "read_image", forbidden)
    monkeypatch.setattr(bt.io, "read_wsi", forbidden)


def test_steps_on_a_new_slide_end_to_end(tmp_path, her2st_dir, torch_one_thread, capsys):
    """read -> cells -> fit on three cropped sections; read -> cells --reference -> predict on a fourth, via zarr."""
    import spatialdata as sd

    from bitro._constants import Key

    train_dir, new_dir = tmp_path / "train", tmp_path / "new"
    for s in ("B4", "C2", "C4"):
        crop_section(her2st_dir, train_dir, s)
    crop_section(her2st_dir, new_dir, "C3")
    (tmp_path / "genes.txt").write_text("\n".join(GENES))

    main(["read", str(train_dir), "--out", str(tmp_path / "train.zarr")])
    main(["cells", str(tmp_path / "train.zarr"), "--out", str(tmp_path / "train_cells.zarr")])
    model_dir = str(tmp_path / "model")
    main(["fit", str(tmp_path / "train_cells.zarr"), "--model", model_dir, "--genes", str(tmp_path / "genes.txt"), "--epochs", "2"])  # fmt: skip
    # a diverging run is one sentence with exit code 2, and the saved model is left as it was
    saved = (tmp_path / "model" / "config.json").read_text()
    with pytest.raises(SystemExit) as e:
        main(["fit", str(tmp_path / "train_cells.zarr"), "--model", model_dir, "--genes", str(tmp_path / "genes.txt"), "--epochs", "3", "--lr", "1e6", "--overwrite"])  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Training diverged" in err and "smaller learning rate" in err
    assert (tmp_path / "model" / "config.json").read_text() == saved
    main(["read", str(new_dir), "--out", str(tmp_path / "new.zarr")])
    main(["cells", str(tmp_path / "new.zarr"), "--out", str(tmp_path / "new_cells.zarr"), "--reference", model_dir])
    main(["predict", str(tmp_path / "new_cells.zarr"), "--model", model_dir, "--out", str(tmp_path / "pred.zarr")])

    config = json.loads((tmp_path / "model" / "config.json").read_text())
    new = sd.read_zarr(tmp_path / "new_cells.zarr")
    cells = new[Key.CELLS_TABLE]
    record = cells.uns[Key.UNS][Key.EXTRACT_CELLS]
    assert record["fitted_on"] == "reference"
    assert record["fingerprint"] == config["features"]["fingerprint"]
    assert cells.uns[Key.UNS][Key.PHENOTYPES]["fitted_on"] == "reference"
    assert config["stain_reference"]["image"] == "B4_image"  # the training sections' stain reference ...
    assert new.attrs["bitro"]["normalize_stain"]["C3_image_normalized"]["image_key"] == "C3_image"  # ... applied
    assert not any(k.endswith(Key.NORMALIZED_SUFFIX) for k in new.images)  # lazy views are not written

    pred = sd.read_zarr(tmp_path / "pred.zarr")
    expr, spots = pred[Key.PREDICTED_CELLS_TABLE], pred[Key.PREDICTED_SPOTS_TABLE]
    assert expr.n_obs == cells.n_obs == len(pred.shapes["C3_cells"])  # every cell of the slide
    assert list(expr.var_names) == list(spots.var_names) == GENES
    assert np.isfinite(np.asarray(expr.X)).all()
    assert spots.n_obs == pred[Key.SPOTS_TABLE].n_obs  # the measured spots


@pytest.mark.slow
def test_predict_an_image_alone_with_the_bundled_model(tmp_path, her2st_dir, capsys):
    """A whole bundled section's JPEG with nothing else: every segmented cell gets a prediction, figures written."""
    import anndata as ad
    import spatialdata as sd

    from bitro._constants import Key

    image = tmp_path / "slide" / "C3.jpg"
    image.parent.mkdir()
    shutil.copy(her2st_dir / "C3.jpg", image)
    out = tmp_path / "C3_bitro"
    main(["predict", str(image), "--model", "her2st", "--pixel-size", str(HER2ST_PIXEL_SIZE), "--out", str(out)])

    assert "cells" in capsys.readouterr().out
    expr = ad.read_h5ad(out / "cells.h5ad")
    sdata = sd.read_zarr(out / "sdata.zarr")
    n_segmented = len(sdata.shapes["C3_cells"])
    assert n_segmented > 10000
    assert expr.n_obs == sdata[Key.CELLS_TABLE].n_obs == n_segmented
    assert {"ERBB2", "EPCAM"} <= set(expr.var_names)
    assert "loso_pcc" in expr.var  # the model's per-gene scores
    assert np.isfinite(expr.X).all()
    assert Key.PREDICTED_SPOTS_TABLE in sdata.tables and "C3_virtual_spots" in sdata.shapes
    for gene in ("ERBB2", "EPCAM"):
        assert (out / f"expression_{gene}.png").stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["C3_bitro", "slide"]  # no temporary folder left


def test_jpeg_without_pixel_size_fails_before_any_work(tmp_path, capsys, no_work):
    image = tiny_jpeg(tmp_path / "slide.jpg")
    with pytest.raises(SystemExit) as e:
        main(["predict", str(image), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--pixel-size" in err
    assert not (tmp_path / "out").exists()


def test_jpeg_without_pixel_size_exit_code(tmp_path):
    """The same from a shell: exit code 2, one line on stderr, no traceback."""
    image = tiny_jpeg(tmp_path / "slide.jpg")
    run = subprocess.run(
        [sys.executable, "-m", "bitro", "predict", str(image), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "pixel size" in run.stderr and "Traceback" not in run.stderr


def test_corrupt_image_is_one_sentence(tmp_path, capsys):
    """A truncated JPEG: exit code 2 and one line naming the file, not a traceback from the decoder."""
    image = tiny_jpeg(tmp_path / "slide.jpg")
    image.write_bytes(image.read_bytes()[:200])
    with pytest.raises(SystemExit) as e:
        main(["predict", str(image), "--pixel-size", "0.5", "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "slide.jpg" in err and "valid JPEG" in err
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused(tmp_path, capsys, no_work):
    image = tiny_jpeg(tmp_path / "slide.jpg")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(SystemExit) as e:
        main(["predict", str(image), "--pixel-size", "0.5", "--out", str(out)])
    assert e.value.code == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"


def test_unknown_gene_is_refused_before_any_work(tmp_path, capsys):
    image = tiny_jpeg(tmp_path / "slide.jpg")
    with pytest.raises(SystemExit) as e:
        main(["predict", str(image), "--pixel-size", "0.5", "--out", str(tmp_path / "o"), "--genes", "ERBB3"])
    assert e.value.code == 2
    assert "does not predict ['ERBB3']" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate_weights", "corrupted or truncated"),
        ("truncate_config", "corrupted or truncated"),
        ("drop_reference", "missing"),
        ("edit_architecture", "architecture"),
        ("no_config", "is not a saved bitro model"),
    ],
)
def test_damaged_model_folder_gives_a_clear_error(tmp_path, capsys, damage, message):
    from bitro.tl._persist import BUNDLED_DIR

    model = tmp_path / "model"
    shutil.copytree(BUNDLED_DIR / "her2st", model)
    if damage == "truncate_weights":
        data = (model / "weights.safetensors").read_bytes()
        (model / "weights.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "truncate_config":
        text = (model / "config.json").read_text()
        (model / "config.json").write_text(text[: len(text) // 2])
    elif damage == "drop_reference":
        (model / "reference.safetensors").unlink()
    elif damage == "edit_architecture":
        config = json.loads((model / "config.json").read_text())
        config["architecture"]["dim"] *= 2
        (model / "config.json").write_text(json.dumps(config))
    else:
        (model / "config.json").unlink()
    image = tiny_jpeg(tmp_path / "slide.jpg")
    with pytest.raises(SystemExit) as e:
        main(["predict", str(image), "--model", str(model), "--pixel-size", "0.5", "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_unknown_model_name_lists_the_bundled_ones(tmp_path, capsys):
    image = tiny_jpeg(tmp_path / "slide.jpg")
    with pytest.raises(SystemExit):
        main(["predict", str(image), "--model", "her2st_v9", "--pixel-size", "0.5", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "no bundled model is called 'her2st_v9'" in err and "['her2st']" in err


def test_bundled_model_loads_by_name_in_a_fresh_process():
    code = (
        "import bitro as bt; m = bt.tl.load_model('her2st'); s = m.config.gene_scores; "
        "assert all(len(v) == len(m.genes) for v in s.values()); "
        "print(len(m.genes), len(m.nets), sorted(s), 'ERBB2' in m.genes)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    n_genes, n_nets, *rest = run.stdout.split()
    assert int(n_genes) >= 700 and int(n_nets) == 3
    assert rest[-1] == "True"


def test_bundled_models_lists_the_shipped_folders():
    """Every name `bt.tl.bundled_models` lists loads, with its model card beside it; a folder without a config is no
    model."""
    import bitro as bt
    from bitro.tl._persist import BUNDLED_DIR

    names = bt.tl.bundled_models()
    assert names == sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "config.json").is_file())
    assert "her2st" in names
    for name in names:
        assert (BUNDLED_DIR / name / "MODEL_CARD.md").is_file()
        assert bt.tl.load_model(name).genes


def test_staged_folder_keeps_the_old_output_until_the_new_one_is_complete(tmp_path):
    from bitro._pipeline import staged_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_folder(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("crash while writing")
    assert (out / "old.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with staged_folder(out, overwrite=True) as tmp:
        assert (out / "old.txt").exists()  # still there while the new output is written
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(FileExistsError, match="--overwrite"), staged_folder(out, overwrite=False):
        pass


def test_read_image(tmp_path):
    from PIL import Image
    from spatialdata.transformations import get_transformation

    import bitro as bt
    from bitro._utils import scale0

    rgb = np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "my slide.png")
    sdata = bt.io.read_image(tmp_path / "my slide.png", pixel_size=0.5)
    image = sdata.images["my_slide_image"]
    np.testing.assert_array_equal(scale0(image).transpose("y", "x", "c").values, rgb)
    assert get_transformation(image, "my_slide_um").scale.tolist() == [1.0, 0.5, 0.5]
    assert [s.pixel_size for s in bt.io.get_sections(sdata)] == [0.5]
    assert "C9_image" in bt.io.read_image(tmp_path / "my slide.png", pixel_size=0.5, sample="C9").images
    for bad in (None, 0, -1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="pixel"):
            bt.io.read_image(tmp_path / "my slide.png", pixel_size=bad)
    with pytest.raises(FileNotFoundError):
        bt.io.read_image(tmp_path / "missing.png", pixel_size=0.5)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png"):
        bt.io.read_image(tmp_path / "text.png", pixel_size=0.5)


def test_figure_genes():
    from types import SimpleNamespace

    from bitro._pipeline import figure_genes

    model = SimpleNamespace(
        genes=["A", "ERBB2", "B", "C"], config=SimpleNamespace(gene_scores={"loso_pcc": [0.1, 0.2, np.nan, 0.5]})
    )
    assert figure_genes(model) == ["ERBB2"]
    assert figure_genes(model, ["B"]) == ["B"]
    with pytest.raises(KeyError, match="ERBB2"):
        figure_genes(model, ["ERBB3"])
    model.genes[1] = "D"
    assert figure_genes(model) == ["C", "D"]  # best-scored first, NaN last
