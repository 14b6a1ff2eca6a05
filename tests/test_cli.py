from __future__ import annotations

import subprocess
import sys

import pytest

from bitro._cli import main
from bitro._pipeline import check_output_dir


def test_help_lists_the_steps(capsys):
    out = subprocess.run([sys.executable, "-m", "bitro", "--help"], capture_output=True, text=True, check=True).stdout
    # the usage line lists the sub-commands argparse knows; the description's prose mentions them too, so
    # looking for the bare names could not fail
    assert "{demo,read,cells,fit,predict}" in out.splitlines()[0] + out.splitlines()[1]
    for step in ("demo", "read", "cells", "fit", "predict"):
        with pytest.raises(SystemExit) as e:
            main([step, "--help"])
        assert e.value.code == 0 and f"usage: bitro {step}" in capsys.readouterr().out


def test_demo_refuses_an_existing_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_check_output_dir(tmp_path):
    assert check_output_dir(tmp_path / "new", overwrite=False) == tmp_path / "new"
    assert check_output_dir(tmp_path, overwrite=True) == tmp_path
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        check_output_dir(tmp_path / "file", overwrite=True)


def test_steps_refuse_missing_or_existing_paths(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["cells", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "out.zarr")])
    assert "No SpatialData store" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", str(tmp_path / "missing.zarr"), "--model", str(tmp_path)])
    assert "exists" in capsys.readouterr().err


def test_read_writes_a_store(tmp_path, her2st_dir):
    import shutil

    import spatialdata as sd

    folder = tmp_path / "st"
    folder.mkdir()
    for name in ("B4.jpg", "B4.tsv.gz", "B4_selection.tsv"):
        shutil.copy(her2st_dir / name, folder / name)
    main(["read", str(folder), "--out", str(tmp_path / "b4.zarr")])
    sdata = sd.read_zarr(tmp_path / "b4.zarr")
    assert "B4_image" in sdata.images and "spots" in sdata.tables


def test_help_shows_the_new_options():
    for step, options in (("predict", ("--pixel-size", "--genes", "her2st")), ("cells", ("--reference",))):
        out = subprocess.run(
            [sys.executable, "-m", "bitro", step, "--help"], capture_output=True, text=True, check=True
        ).stdout
        for option in options:
            assert option in out


def test_cells_reference_fixes_the_feature_settings(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["cells", str(tmp_path), "--out", str(tmp_path / "o.zarr"), "--reference", "her2st", "--encoder", "x"])
    assert e.value.code == 2
    assert "--encoder cannot be combined with --reference" in capsys.readouterr().err


def test_predict_refuses_bad_inputs(tmp_path, capsys):
    store = tmp_path / "cells.zarr"
    store.mkdir()
    with pytest.raises(SystemExit) as e:
        main(["predict", str(store), "--pixel-size", "0.5", "--out", str(tmp_path / "p.zarr")])
    assert e.value.code == 2
    assert "--pixel-size is for image files" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", str(tmp_path / "missing.svs"), "--out", str(tmp_path / "o")])
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
