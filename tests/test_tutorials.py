"""Run every tutorial notebook top to bottom on small data (``BITRO_TUTORIAL_SMALL=1``), and check what is committed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = (
    "predict_your_own_slide.ipynb",
    "her2st_end_to_end.ipynb",
    "your_own_visium.ipynb",
    "cell_resolved_data.ipynb",
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
    "transfer_bulk_spot.ipynb": """
import numpy as np
for x in (b, c):  # reloaded adapters, merged model
    assert np.allclose(a.obsm["bitro_predicted"], x.obsm["bitro_predicted"], atol=1e-4)
assert np.isfinite(a.obsm["bitro_predicted"].to_numpy()).all()
""",
}
#: Largest committed notebook, outputs included (figures are PNGs at modest dpi).
MAX_BYTES = 3_000_000


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _kernel_manager(tmp: Path):
    """A kernel manager whose kernel runs this interpreter (the environment under test), via a spec in ``tmp``."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp / "kernels" / "bitro-test"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "bitro test",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return KernelManager(
        kernel_name="bitro-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp / "kernels")])
    )


def test_every_tutorial_is_listed():
    assert sorted(p.name for p in TUTORIALS.glob("*.ipynb")) == sorted(NOTEBOOKS) == sorted(CHECKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook(name):
    """Outputs are committed from a full run: every code cell executed in order, no errors, small file."""
    import nbformat

    path = TUTORIALS / name
    assert path.stat().st_size < MAX_BYTES, f"{name} is {path.stat().st_size} bytes; shrink its outputs"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert 'SMALL = os.environ.get("BITRO_TUTORIAL_SMALL") == "1"' in code[0].source
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "re-run the notebook top to bottom"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name} was committed with an error: {errors[0].ename}: {errors[0].evalue}"
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), "no figure in the outputs"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_tutorial_runs(name, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("BITRO_TUTORIAL_SMALL", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's own inline backend
    before = _snapshot(TUTORIALS)
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    work = tmp_path / "work"
    work.mkdir()
    client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=600, resources={"metadata": {"path": str(work)}})
    nb.cells.append(nbformat.v4.new_code_cell(CHECKS[name]))  # run last, in the notebook's own kernel
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):  # raises CellExecutionError, naming the cell, on any error
            client.execute_cell(cell, index)
    assert _snapshot(TUTORIALS) == before, "running a tutorial must not write into tutorials/"
