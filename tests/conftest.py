from __future__ import annotations

import logging
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]
SHARED_HER2ST = REPO.parent / "shared" / "data" / "her2st"


@pytest.fixture(scope="session")
def her2st_dir() -> Path:
    """Folder with the real HER2ST sections: the shared copy beside the repository, else the bundled one."""
    if SHARED_HER2ST.is_dir():
        return SHARED_HER2ST
    from bitro.datasets._her2st import BUNDLED_DIR

    return BUNDLED_DIR


@pytest.fixture(autouse=True)
def _quiet_progress():
    """No progress bars in test output; restore settings afterwards."""
    import bitro

    old = bitro.settings.progress
    bitro.settings.progress = False
    yield
    bitro.settings.progress = old


@pytest.fixture
def caplog_bitro(caplog):
    """caplog that also sees the non-propagating ``bitro`` logger."""
    logger = logging.getLogger("bitro")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def _toy_tl_tables(n_samples: int = 3, n_genes: int = 12, n_features: int = 8, seed: int = 0):
    """Small spot + cell tables in the layout `bt.pp` writes, with expression driven by the cell features.

    Cells of 3 types (features shifted by type) lie at random in each section; spots on a 4 x 4 grid
    (100 um apart, radius 25 um, 0.5 um/px); a spot's counts are Poisson around the sum of its cells'
    type profiles.
    """
    import anndata as ad
    import numpy as np
    import pandas as pd
    import squidpy as sq

    rng = np.random.default_rng(seed)
    px, n_cells = 0.5, 500
    profiles = rng.gamma(2.0, 2.0, size=(3, n_genes))
    type_shift = rng.normal(0, 1.5, size=(3, n_features))
    spot_list, cell_list = [], []
    for s in range(n_samples):
        sample = f"S{s}"
        grid = np.array([(100 + 200 * i, 100 + 200 * j) for i in range(4) for j in range(4)], float)
        ids = [f"{i}x{j}" for i in range(4) for j in range(4)]
        xy = rng.uniform(0, 800, size=(n_cells, 2))
        ctype = rng.integers(0, 3, n_cells)
        d = np.linalg.norm(xy[:, None] - grid[None], axis=2)
        spot = np.where(d.min(1) <= 50, np.array(ids, dtype=object)[d.argmin(1)], None)
        obs = pd.DataFrame(
            {"sample": sample, "spot_id": spot, "phenotype": pd.Categorical(ctype.astype(str))},
            index=[f"{sample}_c{i}" for i in range(n_cells)],
        )
        c = ad.AnnData(obs=obs)
        c.obsm["X_bitro"] = (rng.normal(size=(n_cells, n_features)) + type_shift[ctype]).astype(np.float32)
        c.obsm["spatial"] = xy
        cell_list.append(c)
        lam = np.stack([profiles[ctype[spot == i]].sum(0) * 3 + 0.5 for i in ids])
        counts = rng.poisson(lam).astype(np.float32)
        a = ad.AnnData(counts, obs=pd.DataFrame({"sample": sample, "spot_id": ids}, index=[f"{sample}_{i}" for i in ids]))
        a.var_names = [f"G{g}" for g in range(n_genes)]
        a.obsm["spatial"] = grid
        spot_list.append(a)
    spots = ad.concat(spot_list)
    cells = ad.concat(cell_list)
    cells.obs["phenotype"] = cells.obs["phenotype"].astype("category")
    cells.obs["sample"] = cells.obs["sample"].astype("category")
    sq.gr.spatial_neighbors_knn(cells, library_key="sample", n_neighs=6)
    cells.uns["bitro"] = {"pixel_size": {f"S{s}": px for s in range(n_samples)}, "extract_cells": toy_record(cells)}
    return spots, cells


def toy_record(cells, encoder: str = "toy"):
    """A real extraction record for toy features: the raw features go through the scaler + PCA of `bt.pp`."""
    from bitro._features import fingerprint
    from bitro._reducer import apply_reducer, fit_reducer

    raw = cells.obsm["X_bitro"]
    cells.obsm["X_bitro_raw"] = raw
    reducer = fit_reducer(raw, raw.shape[1])
    cells.obsm["X_bitro"] = apply_reducer(raw, reducer)
    record = {
        "encoder": encoder,
        "weights_sha256": "",
        "crop_um": 24.0,
        "crop_px": 48,
        "add_morphology": False,
        "n_raw_features": raw.shape[1],
        "feature_names": [f"f{i}" for i in range(raw.shape[1])],
        "fitted_on": "these cells",
        "reducer": reducer,
    }
    record["fingerprint"] = fingerprint(record)
    return record


@pytest.fixture(scope="session")
def _toy_tl_cache():
    return _toy_tl_tables()


@pytest.fixture
def toy_tl(_toy_tl_cache):
    """(spots, cells) for `bt.tl` tests: fresh copies of a small session-cached toy data set."""
    spots, cells = _toy_tl_cache
    return spots.copy(), cells.copy()


@pytest.fixture
def torch_one_thread():
    """Run torch on one thread (tiny models on a shared machine are faster so); restore afterwards."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
