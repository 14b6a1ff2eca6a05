"""The model registry: a toy model, written as docs/contributing.md shows it, is trained, saved, loaded and predicts."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import bitro as bt

pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

CONTRIBUTING = Path(__file__).resolve().parents[1] / "docs" / "contributing.md"


@pytest.fixture
def toy_model_registered():
    """The toy model of docs/contributing.md, registered by running the page's code; unregistered afterwards."""
    from bitro.tl.models import MODELS

    block = re.findall(r"```python\n(.*?)```", CONTRIBUTING.read_text(), flags=re.S)[0]
    namespace: dict = {}
    exec(compile(block, str(CONTRIBUTING), "exec"), namespace)  # noqa: S102 - the documentation's own code
    yield namespace
    MODELS.pop("toy", None)


def test_toy_model_trains_saves_loads_and_predicts(toy_model_registered, toy_tl, tmp_path):
    spots, cells = toy_tl
    model = bt.tl.fit(spots, cells=cells, model="toy", hidden=8, epochs=3, n_members=2, batch_size=8)
    assert model.config.model == "toy"
    assert type(model.config.architecture).__name__ == "ToyArchitecture" and model.config.architecture.hidden == 8
    assert type(model.nets[0]).__name__ == "ToyNet" and len(model.nets) == 2
    assert set(model.history[0]) >= {"train_loss", "train_mse", "val_pcc_gene", "best_epoch"}
    expr = bt.tl.predict(model, spots, cells=cells)
    before = spots.obsm["bitro_predicted"].to_numpy().copy()
    assert expr.n_obs == cells.n_obs and list(expr.var_names) == model.genes and np.isfinite(expr.X).all()

    model.save(tmp_path / "toy")
    loaded = bt.tl.load_model(tmp_path / "toy")
    assert loaded.config.model == "toy" and type(loaded.nets[0]).__name__ == "ToyNet"
    expr_loaded = bt.tl.predict(loaded, spots, cells=cells)
    np.testing.assert_allclose(spots.obsm["bitro_predicted"].to_numpy(), before, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(expr_loaded.X, expr.X, rtol=1e-5, atol=1e-6)


def test_toy_model_options_are_checked(toy_model_registered, toy_tl):
    spots, cells = toy_tl
    with pytest.raises(TypeError, match=r"Unknown option \['dim'\] for ToyArchitecture"):
        bt.tl.fit(spots, cells=cells, model="toy", dim=8)
    with pytest.raises(TypeError, match="`hidden` must be an integer"):
        bt.tl.fit(spots, cells=cells, model="toy", hidden=2.5)


def test_unknown_model_name_lists_the_registered_ones(toy_tl):
    spots, cells = toy_tl
    with pytest.raises(ValueError, match=r"model='m2' is not a registered model; use one of \['bitro'"):
        bt.tl.fit(spots, cells=cells, model="m2")


def test_a_saved_model_of_an_unregistered_kind_fails_clearly(toy_model_registered, toy_tl, tmp_path):
    from bitro.tl.models import MODELS

    spots, cells = toy_tl
    bt.tl.fit(spots, cells=cells, model="toy", epochs=1, n_members=1).save(tmp_path / "toy")
    MODELS.pop("toy")
    with pytest.raises(ValueError, match="model='toy' is not a registered model"):
        bt.tl.load_model(tmp_path / "toy")


def test_register_refuses_what_is_not_a_network():
    from bitro.tl.models import register

    with pytest.raises(TypeError, match="not a network class"):
        register("bad", dict)
    with pytest.raises(ValueError, match="simple identifier"):
        register("no spaces", "m:C")
