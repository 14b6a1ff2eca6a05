"""Cell-resolved training data (Xenium-like): train on pseudo-spots, score the predicted cells against the true cells.

For each data seed, ``bt.datasets.synthetic(3, size=1024, seed=seed, layout="cells")`` makes three sections with
per-cell Poisson counts annotating the true nuclei (no spots). ``bt.pp.pseudo_spots(diameter_um=55,
pitch_um=100)`` sums the cells into Visium-like spots; the cells come from the true nuclei (``bt.pp.extract_cells``,
handcrafted encoder), with ``bt.pp.phenotypes(n_clusters=4)`` and ``bt.pp.spatial_graph``. ``bt.tl.fit`` trains on
the pseudo-spots of ``synth0`` and ``synth1`` (20 epochs, ``validation=None``), ``bt.tl.predict(...,
coverage="spots")`` predicts the cells inside the pseudo-spots of ``synth2``, and ``bt.tl.evaluate_cells`` scores
them against the cells' own counts: PCC_gene over cells, and the within-spot score (after subtracting each spot's
mean), beside the equal split (every cell of a spot gets the spot's prediction; within-spot 0 by construction).

Each configuration is a set of ``bt.tl.fit`` options; the default model is ``"default"``. Usage::

    python benchmarks/cell_resolved.py                                   # default, "gene" readout, no GAT
    python benchmarks/cell_resolved.py --configs default --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

SAMPLES = ("synth0", "synth1", "synth2")
CONFIGS = {
    "default": {},
    "gene readout": {"readout": "gene"},
    "no GAT": {"gat_layers": 0},
    "no fields": {"field_radii": ()},
}


def prepare(seed: int, size: int):
    """The Xenium-like SpatialData with its pseudo-spots and the cell table."""
    import bitro as bt

    sdata = bt.datasets.synthetic(3, size=size, seed=seed, layout="cells")
    bt.pp.pseudo_spots(sdata, diameter_um=55, pitch_um=100)
    cells = bt.pp.extract_cells(sdata, shapes_key={s: f"{s}_true_nuclei" for s in SAMPLES})
    bt.pp.phenotypes(cells, n_clusters=4)
    bt.pp.spatial_graph(cells)
    return sdata, cells


def score(sdata, cells, options: dict, epochs: int):
    """PCC_gene over the held-out cells and within-spot score, for the model and the equal split."""
    import bitro as bt

    spots = sdata["spots"]
    held = (spots.obs["sample"] == SAMPLES[-1]).to_numpy()
    model = bt.tl.fit(spots[~held].copy(), cells=cells, epochs=epochs, validation=None, **options)
    expr = bt.tl.predict(model, spots[held].copy(), cells=cells, coverage="spots")
    table = bt.tl.evaluate_cells(expr, sdata["table"]).set_index("method")
    return {
        "cells": float(table.loc["bitro", "pcc_gene"]),
        "equal": float(table.loc["equal split", "pcc_gene"]),
        "within": float(table.loc["bitro", "within_spot"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), help=f"subset of {list(CONFIGS)}")
    args = p.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        import torch

        import bitro as bt

    torch.set_num_threads(args.threads)
    bt.settings.progress = False
    bt.logger.setLevel("WARNING")
    logging.getLogger("spatialdata._logging").setLevel("WARNING")
    t0 = time.perf_counter()
    print("| config | seed | cells PCC_gene | equal split | gain | within-spot |\n|---|---|---|---|---|---|")
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        p.error(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    results: dict[str, list[dict]] = {c: [] for c in args.configs}
    for seed in args.seeds:
        sdata, cells = prepare(seed, args.size)
        for name in args.configs:
            r = score(sdata, cells, CONFIGS[name], args.epochs)
            results[name].append(r)
            gain = r["cells"] - r["equal"]
            print(f"| {name} | {seed} | {r['cells']:.3f} | {r['equal']:.3f} | {gain:+.3f} | {r['within']:.3f} |")
    import numpy as np

    print("\nmedians over seeds:\n\n| config | cells PCC_gene | equal split | gain | within-spot |\n|---|---|---|---|---|")
    for name, rows in results.items():
        med = {k: float(np.median([r[k] for r in rows])) for k in ("cells", "equal", "within")}
        gain = float(np.median([r["cells"] - r["equal"] for r in rows]))
        print(f"| {name} | {med['cells']:.3f} | {med['equal']:.3f} | {gain:+.3f} | {med['within']:.3f} |")
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
