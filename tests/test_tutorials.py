"""Run every tutorial notebook top to bottom on small data, and check what is committed.

The notebooks show no test plumbing: each has a code cell tagged ``parameters`` (papermill's convention) holding
the sizes of the run, and the harness runs the notebook with a cell from ``SMALL`` injected right after it (small
windows, few epochs). Committed outputs come from ``tutorials/execute.py`` (a full run on the real data), which
stamps the notebook with the bitro version and a hash of its code cells; ``test_outputs_are_fresh`` compares them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = (
    "predict_your_own_slide.ipynb",
    "her2st_end_to_end.ipynb",
    "your_own_visium.ipynb",
    "cell_resolved_data.ipynb",
    "regions_and_batch_free_expression.ipynb",
    "transfer_bulk_spot.ipynb",
)
#: What each tutorial computed, checked in its own kernel after the run: a notebook that runs but gets a wrong
#: answer fails here.
CHECKS = {
    "predict_your_own_slide.ipynb": """
import numpy as np
assert expr.n_obs > 1000 and expr.n_vars == len(model.genes), expr
assert np.isfinite(np.asarray(expr.X)).all()
assert expr.n_obs == sdata["cells"].n_obs == sdata["bitro_cells"].n_obs  # every tissue cell is predicted
""",
    "her2st_end_to_end.ipynb": """
import numpy as np
pred = test.obsm["bitro_predicted"]
assert np.isfinite(pred.to_numpy()).all() and pred.shape == (test.n_obs, len(model.genes))
assert np.allclose(again.obsm["bitro_predicted"], pred)  # the saved and reloaded model predicts the same
""",
    "your_own_visium.ipynb": """
import numpy as np
import bitro as bt
scores = bt.tl.evaluate(test.copy(), key_added="check")
assert scores["pcc_gene"].iloc[0] > 0.3, scores  # synthetic slides with a known signal: the mean profile scores 0
again = test.copy()
bt.tl.predict(bt.tl.load_model("visium_model"), again, cells=cells)
assert np.allclose(again.obsm["bitro_predicted"], test.obsm["bitro_predicted"])
""",
    "cell_resolved_data.ipynb": """
ours, equal = scores.set_index("method").loc["bitro"], scores.set_index("method").loc["equal split"]
assert ours["pcc_gene"] > equal["pcc_gene"] and ours["within_spot"] > 0.05, scores  # the default readout's cells
assert abs(equal["within_spot"]) < 1e-9
assert every_cell.n_obs == slide_cells.n_obs  # a slide without counts: every cell predicted
""",
    "regions_and_batch_free_expression.ipynb": """
import numpy as np
import bitro as bt
assert new_spots.n_obs > 100 and new_spots.obs["region_predicted"].notna().all()  # every spot of the new slide
assert predicted.equals(classifier.predict(new_spots.copy(), key_added=None))  # loaded = trained, exactly
reloaded = bt.tl.load_image_aligner("regions_model/aligner").embed(new_spots, key_added=None)
assert np.array_equal(reloaded, aligner.embed(new_spots, key_added=None))
assert scores.loc["raw image features", "macro-F1"] > scores.iloc[-1]["macro-F1"], scores  # above the majority class
assert raw["folds"].loc["all", "macro_f1"] > raw["folds"]["majority_macro_f1"].max(), raw["folds"]
mixing = pd.DataFrame(rows).T.iloc[:, 0]
assert mixing["scANVI latent"] > mixing["log1p CP10k PCA"], mixing  # the patients mix better than in PCA
assert spots.obs["region_transferred"].notna().all() and spots.obs["region_transferred_confidence"].between(0, 1).all()
""",
    "transfer_bulk_spot.ipynb": """
import numpy as np
for x in (b, c):  # reloaded adapters, merged model
    assert np.allclose(a.obsm["bitro_predicted"], x.obsm["bitro_predicted"], atol=1e-4)
assert np.isfinite(a.obsm["bitro_predicted"].to_numpy()).all()
""",
}
#: Injected after each notebook's ``parameters`` cell by ``test_tutorial_runs``: the small run.
SMALL = {
    "predict_your_own_slide.ipynb": """
# test harness: a 2000 x 2000 px window (1.4 mm) of tumour and stroma of the slide, for a quick run
from PIL import Image as _Image
with _Image.open(slide) as _im:
    _im.crop((2100, 5200, 4100, 7200)).save("B4_window.jpg", quality=95)
slide = Path("B4_window.jpg")
""",
    "her2st_end_to_end.ipynb": """
# test harness: three sections, a 1200 x 1200 px window around the middle of each, 2 epochs
import numpy as _np
import spatialdata as _sd
SECTIONS, EPOCHS = ["C2", "C3", "C4"], 2
_her2st = bt.datasets.her2st
def _windows(samples=None, **kwargs):
    sdata = _her2st(samples, **kwargs)
    crops = []
    for s in samples:
        centre = _np.median(sdata["spots"][sdata["spots"].obs["sample"] == s].obsm["spatial"], axis=0)
        crops.append(_sd.bounding_box_query(sdata.subset([f"{s}_image", f"{s}_spots"], filter_tables=True),
                     axes=("x", "y"), min_coordinate=centre - 600, max_coordinate=centre + 600,
                     target_coordinate_system=s))
    return _sd.concatenate(crops, concatenate_tables=True)
bt.datasets.her2st = _windows
""",
    "your_own_visium.ipynb": """
# test harness: smaller images, few epochs
SIZE, EPOCHS = 1024, 4
""",
    "cell_resolved_data.ipynb": """
# test harness: smaller slides, fewer epochs
SIZE, EPOCHS = 768, 10
""",
    "regions_and_batch_free_expression.ipynb": """
# test harness: four labelled atlas sections, two imaged sections, few epochs
ATLAS_SECTIONS, IMAGED = ["A1", "B1", "D1", "G2"], ["B4", "C3"]
EPOCHS, SCANVI_EPOCHS, ALIGN_EPOCHS, UMAP_SPOTS = 20, 5, 5, 800
""",
    "transfer_bulk_spot.ipynb": """
# test harness: smaller slides, fewer epochs
SIZE, EPOCHS = 640, 5
""",
}

#: Largest committed notebook, outputs included (figures are PNGs at modest dpi).
MAX_BYTES = 3_000_000


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _execute_module():
    """``tutorials/execute.py``, which runs and stamps the notebooks (one definition of the hash)."""
    spec = importlib.util.spec_from_file_location("bitro_tutorials_execute", TUTORIALS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parameters_index(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and nb.cells[tagged[0]].cell_type == "code", "one code cell tagged 'parameters'"
    return tagged[0]


def test_every_tutorial_is_listed():
    assert sorted(p.name for p in TUTORIALS.glob("*.ipynb")) == sorted(NOTEBOOKS) == sorted(CHECKS)
    assert sorted(SMALL) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook(name):
    """Outputs are committed from a full run: every code cell executed in order, no errors, small file."""
    import nbformat

    path = TUTORIALS / name
    assert path.stat().st_size < MAX_BYTES, f"{name} is {path.stat().st_size} bytes; shrink its outputs"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    _parameters_index(nb)  # no test plumbing in view: the harness injects the small run after the parameters cell
    for cell in code:
        for plumbing in ("BITRO_TUTORIAL_SMALL", "SMALL", "figure.dpi", "logging.getLogger", "from bitro.tl._"):
            assert plumbing not in cell.source, f"{name}: {plumbing!r} in a cell:\n{cell.source}"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "re-run the notebook top to bottom"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name} was committed with an error: {errors[0].ename}: {errors[0].evalue}"
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), "no figure in the outputs"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_outputs_are_fresh(name):
    """The committed outputs were made by the committed code cells with this bitro's major.minor version."""
    import nbformat

    import bitro

    execute = _execute_module()
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    stamp = nb.metadata.get("bitro")
    rerun = f"re-execute it: python tutorials/execute.py tutorials/{name}"
    assert stamp, f"{name} has no execution stamp; {rerun}"
    assert stamp["cells_sha256"] == execute.cells_sha256(nb), f"{name}: code cells changed since its outputs; {rerun}"
    assert "defaults" in stamp, f"{name}: its outputs were made before bitro's defaults were recorded; {rerun}"
    changed = execute.changed_defaults(stamp["defaults"])
    assert not changed, f"{name}: defaults changed since its outputs were made ({', '.join(changed[:5])}); {rerun}"
    assert execute.major_minor(stamp["version"]) == execute.major_minor(bitro.__version__), (
        f"{name}: outputs from bitro {stamp['version']}, the package is {bitro.__version__}; {rerun}"
    )


def test_changed_defaults_sees_a_changed_default_not_a_new_option(monkeypatch):
    """A function's keyword default, a model's architecture field, a DEFAULT_* and a model's default LoRA layers count;
    a new option does not."""
    import dataclasses
    import inspect

    import bitro as bt
    from bitro.tl.models import _bitro

    execute = _execute_module()
    recorded = execute.defaults()
    assert recorded["bitro.tl.models._bitro.DEFAULT_GENE_RANK"] == repr(_bitro.DEFAULT_GENE_RANK)
    assert execute.changed_defaults(recorded) == []
    monkeypatch.setattr(_bitro, "DEFAULT_GENE_RANK", _bitro.DEFAULT_GENE_RANK + 1)
    assert execute.changed_defaults(recorded) == ["bitro.tl.models._bitro.DEFAULT_GENE_RANK"]
    monkeypatch.undo()
    sig = inspect.signature(bt.tl.fit)  # fit as it is, but one more epoch by default, and a new option

    def fit_changed(*args, **kwargs):
        return None

    params = [p.replace(default=p.default + 1) if p.name == "epochs" else p for p in sig.parameters.values()]
    new = inspect.Parameter("new_option", inspect.Parameter.KEYWORD_ONLY, default=None)
    last = len(params) - (params[-1].kind is inspect.Parameter.VAR_KEYWORD)  # before **options
    fit_changed.__signature__ = sig.replace(parameters=[*params[:last], new, *params[last:]])
    monkeypatch.setattr(bt.tl, "fit", fit_changed)
    assert execute.changed_defaults(recorded) == ["bitro.tl.fit(epochs)"]
    monkeypatch.undo()
    field = next(f for f in dataclasses.fields(_bitro.BitroArchitecture) if f.name == "retrieval_weight")
    monkeypatch.setattr(field, "default", 0.25)
    assert execute.changed_defaults(recorded) == ["bitro.tl.models._bitro.BitroArchitecture.retrieval_weight"]
    monkeypatch.undo()
    monkeypatch.setattr(_bitro.BitroNet, "lora_targets", {"spot": ("q", "v"), "bulk": ("q", "v")})  # the layers bt.tl.transfer adapts by default
    assert execute.changed_defaults(recorded) == ["bitro.tl.models.MODELS['bitro'].lora_targets"]
    monkeypatch.undo()
    assert execute.changed_defaults(recorded) == []


def test_freshness_stamp_sees_edits():
    """The hash covers code cells only, in order: an edited or reordered cell changes it, a markdown edit does not."""
    import nbformat

    execute = _execute_module()
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_markdown_cell("# a"), nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("y")]
    )
    before = execute.cells_sha256(nb)
    nb.cells[0].source = "# b"
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="out")]
    assert execute.cells_sha256(nb) == before
    nb.cells[1].source = "x = 2"
    assert execute.cells_sha256(nb) != before
    nb.cells[1].source = "y"
    nb.cells[2].source = "x = 1"
    assert execute.cells_sha256(nb) != before
    assert execute.major_minor("0.1.0.dev0") == execute.major_minor("0.1.3") == "0.1"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_tutorial_runs(name, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's own inline backend
    before = _snapshot(TUTORIALS)
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    # papermill-style: the small run's parameters right after the notebook's own
    nb.cells.insert(_parameters_index(nb) + 1, nbformat.v4.new_code_cell(SMALL[name]))
    work = tmp_path / "work"
    work.mkdir()
    client = NotebookClient(
        nb, km=_execute_module().kernel_manager(tmp_path), timeout=600, resources={"metadata": {"path": str(work)}}
    )
    nb.cells.append(nbformat.v4.new_code_cell(CHECKS[name]))  # run last, in the notebook's own kernel
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):  # raises CellExecutionError, naming the cell, on any error
            client.execute_cell(cell, index)
    assert _snapshot(TUTORIALS) == before, "running a tutorial must not write into tutorials/"
