"""Cell extraction with a torch encoder on the worker processes of a dask LocalCluster (issue #12, item 6)."""

from __future__ import annotations

import numpy as np
import pytest

import bitro as bt

pytest.importorskip("torch")
pytest.importorskip("distributed")


def test_torch_encoder_on_dask_worker_processes_matches_serial():
    """A torch encoder sent to the worker processes of a LocalCluster gives the features of a serial run."""
    import torch
    from dask.distributed import Client, LocalCluster, get_task_stream

    torch.manual_seed(0)
    encoder = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 5, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    sdata = bt.datasets.synthetic(1, size=512, n_genes=8, n_markers=2)
    kw = {"shapes_key": {"synth0": "synth0_true_nuclei"}, "encoder": encoder, "n_components": 4}
    old = bt.settings.tile_size
    bt.settings.tile_size = 256  # 4 tiles
    try:
        serial = bt.pp.extract_cells(sdata, key_added="serial", n_jobs=1, **kw)
        with (
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
            Client(cluster) as client,
            get_task_stream(client) as stream,
        ):
            dist = bt.pp.extract_cells(sdata, key_added="dask", client=client, **kw)
            workers = set(client.nthreads())
    finally:
        bt.settings.tile_size = old
    ran = [t for t in stream.data if t["key"].startswith("_tile_features")]
    assert ran and {t["worker"] for t in ran} <= workers  # the encoder ran in the worker processes
    assert list(dist.obs_names) == list(serial.obs_names)
    raw = serial.obsm["X_bitro_raw"]
    assert raw.shape[1] >= 4 and np.ptp(raw[:, :4], axis=0).min() > 0  # the torch features vary between cells
    np.testing.assert_allclose(dist.obsm["X_bitro_raw"], raw, rtol=1e-5, atol=1e-6)
