"""Sphinx configuration of the bitro documentation."""

from __future__ import annotations

import os
import shutil
import sys
from datetime import datetime
from importlib.metadata import metadata
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "_ext"))  # bitro_nb: the notebook reader below

# The tutorials live in ../tutorials (executed, outputs committed); copy them in for the build.
_tutorials = HERE / "tutorials"
if (ROOT / "tutorials").is_dir():
    shutil.rmtree(_tutorials, ignore_errors=True)
    shutil.copytree(ROOT / "tutorials", _tutorials, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "*.zarr"))

info = metadata("bitro")
project = info["Name"]
author = "bitro developers"
copyright = f"{datetime.now():%Y}, {author}"
version = release = info["Version"]

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx_autodoc_typehints",
    "sphinx_copybutton",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
default_role = "literal"

autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True
typehints_defaults = "braces"
always_use_bars_union = True

myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3
nb_execution_mode = "off"
# Keep stderr: bitro logs what each step did there ("INFO bitro: Found 24122 nuclei ..."), and the tutorials' text
# relies on it. The reader drops only known import noise (docrep's SyntaxWarning); see docs/_ext/bitro_nb.py.
nb_output_stderr = "show"
nb_custom_formats = {".ipynb": ["bitro_nb.read", {}, False]}
nb_merge_streams = True
suppress_warnings = ["mystnb.unknown_mime_type"]

# Cross-links to other projects' docs need their inventories from the network: only on Read the Docs,
# so that the test suite builds the docs offline with warnings as errors.
intersphinx_mapping = (
    {
        "python": ("https://docs.python.org/3", None),
        "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
    }
    if os.environ.get("READTHEDOCS")
    else {}
)

html_theme = "sphinx_book_theme"
html_static_path = ["_static"]
html_title = "bitro"
html_theme_options = {"path_to_docs": "docs/", "use_repository_button": False}
