from __future__ import annotations

import shutil

import pytest

import bitro as bt
from bitro._constants import Key
from bitro.datasets._her2st import BUNDLED_DIR, available_sections


def test_bundled_copy_matches_the_shared_data(her2st_dir):
    assert available_sections(BUNDLED_DIR) == ["B4", "C2", "C3", "C4"]
    if her2st_dir == BUNDLED_DIR:
        pytest.skip("the shared data folder is not beside the repository")
    for name in ("B4.jpg", "C2.tsv.gz", "C4_selection.tsv", "genes_hist2st_785.txt"):
        assert (BUNDLED_DIR / name).read_bytes() == (her2st_dir / name).read_bytes()
    assert "Nature Communications 12, 6012 (2021)" in (BUNDLED_DIR / "README.md").read_text()


def test_her2st_two_sections_in_one_object():
    sdata = bt.datasets.her2st(["B4", "C2"])
    assert set(sdata.images) == {"B4_image", "C2_image"} and set(sdata.shapes) == {"B4_spots", "C2_spots"}
    assert list(sdata.tables) == [Key.SPOTS_TABLE]
    table = sdata[Key.SPOTS_TABLE]
    assert table.obs[Key.SAMPLE].value_counts().to_dict() == {"B4": 283, "C2": 187}
    assert table.obs_names.is_unique and table.n_vars > 15000
    dataset = table.uns[Key.UNS][Key.DATASET]
    assert "Andersson" in dataset["citation"] and "6012" in dataset["citation"] and "almaan/her2st" in dataset["source"]
    assert set(table.uns[Key.UNS][Key.READ_ST]) == {"B4", "C2"}
    assert [s.sample for s in bt.io.get_sections(sdata)] == ["B4", "C2"]
    # every section keeps its own spots, pixel size and coordinate systems
    assert set(sdata.coordinate_systems) == {"B4", "B4_um", "C2", "C2_um"}
    genes = bt.datasets.her2st_genes()
    assert len(genes) == 785 and len(set(genes)) == 785 and set(genes) <= set(table.var_names)


def test_her2st_from_a_folder_and_the_data_dir_setting(tmp_path, monkeypatch):
    for suffix in (".jpg", ".tsv.gz", "_selection.tsv"):
        shutil.copy(BUNDLED_DIR / f"C3{suffix}", tmp_path / f"C3{suffix}")
    (tmp_path / "C9_selection.tsv").write_text("incomplete section: ignored\n")
    sdata = bt.datasets.her2st(path=tmp_path)
    assert list(sdata.images) == ["C3_image"]
    assert sdata[Key.SPOTS_TABLE].uns[Key.UNS][Key.DATASET]["path"] == str(tmp_path.resolve())
    # bitro.settings.data_dir (from BITRO_HER2ST_DIR, see test_package) is the default folder
    monkeypatch.setattr(bt.settings, "data_dir", tmp_path)
    assert list(bt.datasets.her2st().images) == ["C3_image"]
    assert len(bt.datasets.her2st_genes()) == 785  # not in that folder: the bundled list


def test_her2st_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="No section found"):
        bt.datasets.her2st(path=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bt.datasets.her2st(path=tmp_path / "nope")
    with pytest.raises(KeyError, match=r"\['A1'\] not found .*available: \['B4', 'C2', 'C3', 'C4'\]"):
        bt.datasets.her2st(["B4", "A1"])
    with pytest.raises(ValueError, match="more than once"):
        bt.datasets.her2st(["B4", "B4"])
    with pytest.raises(FileNotFoundError, match="genes_hist2st_785.txt"):
        bt.datasets.her2st_genes(path=tmp_path)
