"""The documentation builds offline with warnings as errors, tutorials included."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_docs_build(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    # Build from a copy: the build writes docs/generated and docs/tutorials, which must not touch the checkout.
    src = tmp_path / "src"
    shutil.copytree(
        REPO / "docs", src / "docs", ignore=shutil.ignore_patterns("_build", "generated", "tutorials", "__pycache__")
    )
    shutil.copytree(REPO / "tutorials", src / "tutorials", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    for md in REPO.glob("*.md"):  # README.md, CHANGELOG.md are included by docs pages
        shutil.copy(md, src / md.name)
    card = Path("src/bitro/datasets/models/her2st/MODEL_CARD.md")  # included by docs/her2st_model.md
    (src / card).parent.mkdir(parents=True)
    shutil.copy(REPO / card, src / card)
    env = {k: v for k, v in os.environ.items() if k != "READTHEDOCS"}  # offline: no intersphinx
    out = tmp_path / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", str(src / "docs"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, f"sphinx failed:\n{proc.stderr[-5000:]}"
    for page in ("index", "api", "benchmarks", "her2st_model", "reliability", "tutorials/index"):
        assert (out / f"{page}.html").is_file(), page
    for nb in (REPO / "tutorials").glob("*.ipynb"):
        html = out / "tutorials" / f"{nb.stem}.html"
        assert html.is_file(), f"tutorial {nb.name} not rendered"
        assert "<img" in html.read_text(), f"tutorial {nb.name} rendered without its figures"
