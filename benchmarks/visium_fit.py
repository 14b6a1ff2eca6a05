"""What training costs as the spots grow towards a Visium capture area (about 4,000-5,000 spots under tissue).

``bt.datasets.synthetic(2, size=S)`` makes two Visium-like sections (0.5 um/px, 55 um spots on a 100 um hexagonal
grid, 80% tissue); the cells come from the true nuclei (no segmentation, whose cost ``benchmarks/wsi.py``
measures), then ``bt.pp.extract_cells`` (handcrafted), ``bt.pp.phenotypes``, ``bt.pp.spatial_graph`` and
``bt.tl.fit`` on both sections' spots (``n_members=1``, ``validation=None``, a fixed number of ``epochs``; one torch
thread), then ``bt.tl.predict`` of every cell of one section (virtual spots over the tissue). Each size runs in two
fresh processes, one that makes the data and writes the spot and cell tables, one that reads them, trains and
predicts, so the training's peak RSS is its own and not the synthetic images'. Printed per size: spots, cells,
seconds of each step, CPU seconds of training per epoch and per 1,000 spot-epochs (CPU time, steadier than wall
time on a shared machine), and the peak RSS of each process. The largest default size, 13,000 px at 0.5 um/px, is
a 6.5 x 6.5 mm Visium capture area (its 20x H&E).

A real model trains for more epochs: the default is at most 100 with early stopping (HER2ST folds stopped after
20-40) and 3 networks, so multiply the per-epoch time by epochs x members for an estimate. Run from the repository
root::

    python benchmarks/visium_fit.py                           # sizes 2048 4096 8192 13000, 5 epochs
    python benchmarks/visium_fit.py --sizes 4096 --epochs 10
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLES = ("synth0", "synth1")


def make(size: int, folder: Path) -> dict:
    """The sections and their cell table, written to ``folder`` (``spots.h5ad``, ``cells.h5ad``)."""
    import bitro as bt
    from bitro._constants import Key

    bt.settings.progress = False
    out = {}
    t = time.perf_counter()
    sdata = bt.datasets.synthetic(len(SAMPLES), size=size, seed=0)
    out["generate s"] = time.perf_counter() - t
    t = time.perf_counter()
    cells = bt.pp.extract_cells(sdata, shapes_key={s: f"{s}_true_nuclei" for s in SAMPLES})
    bt.pp.phenotypes(cells, n_clusters=6)
    bt.pp.spatial_graph(cells)
    out["cells s"] = time.perf_counter() - t
    sdata[Key.SPOTS_TABLE].write_h5ad(folder / "spots.h5ad")
    cells.write_h5ad(folder / "cells.h5ad")
    out["make peak GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return out


def train(folder: Path, epochs: int) -> dict:
    """Fit on the written tables and predict every cell of one section, in this process (its peak RSS is theirs)."""
    import anndata as ad
    import torch

    import bitro as bt
    from bitro._constants import Key

    torch.set_num_threads(1)
    bt.settings.progress = False
    spots, cells = ad.read_h5ad(folder / "spots.h5ad"), ad.read_h5ad(folder / "cells.h5ad")
    out = {"spots": spots.n_obs, "cells": cells.n_obs, "epochs": epochs}
    t, cpu = time.perf_counter(), time.process_time()
    model = bt.tl.fit(spots, cells=cells, n_members=1, epochs=epochs, validation=None)
    out["fit s"], out["fit CPU s"] = time.perf_counter() - t, time.process_time() - cpu
    out["fit peak GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    t = time.perf_counter()
    expr = bt.tl.predict(model, cells[cells.obs[Key.SAMPLE] == SAMPLES[0]].copy())  # no spots: virtual ones
    out["predict s"] = time.perf_counter() - t
    out["predicted cells"] = int(expr.n_obs)
    out["peak GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return out


def _run(*args: str) -> dict:
    cmd = [sys.executable, __file__, *args]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192, 13000], help="image edges in px")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--make", help=argparse.SUPPRESS)
    p.add_argument("--train", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.make:
        print(json.dumps(make(args.size, Path(args.make))))
        return
    if args.train:
        print(json.dumps(train(Path(args.train), args.epochs)))
        return
    print(
        "| image | spots (2 sections) | cells | make the cells s | make peak GB | fit s | fit CPU s | CPU s per epoch "
        "| CPU s per 1,000 spot-epochs | fit peak GB | predict one section's cells s | fit + predict peak GB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            m = _run("--make", tmp, "--size", str(size))
            r = _run("--train", tmp, "--epochs", str(args.epochs))
        per_epoch = r["fit CPU s"] / r["epochs"]
        print(
            f"| {size} px ({size * 0.5 / 1000:.1f} mm) | {r['spots']} | {r['cells']} | {m['cells s']:.0f} "
            f"| {m['make peak GB']:.2f} | {r['fit s']:.0f} | {r['fit CPU s']:.0f} | {per_epoch:.1f} "
            f"| {1000 * per_epoch / r['spots']:.1f} | {r['fit peak GB']:.2f} | {r['predict s']:.0f} | {r['peak GB']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
