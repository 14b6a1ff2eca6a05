"""Benchmark ``bt.datasets.synthetic``: time per call against the bare cost of the SpatialData layout.

For each image size, the median over ``--repeats`` runs of

- ``synthetic``: ``bt.datasets.synthetic(n, size=size)`` (tissue, cells, rendering, counts, elements);
- ``layout``: the baseline, building the same number of image elements from a blank image of the same size
  with :func:`bitro.io._build.image_element` (chunking + pyramid), which any generator has to pay.

Wall clock and process CPU time (less sensitive to other load on a shared machine) are printed, with the ratio
of ``synthetic`` to ``layout`` in CPU time.

Run from the repository root::

    python benchmarks/synthetic.py                  # sizes 512, 1024, 2048; 3 sections; 3 runs each
    python benchmarks/synthetic.py --sizes 2048 --samples 1 --repeats 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _timed(func) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    func()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import bitro as bt
    from bitro.io._build import image_element

    bt.settings.progress = False
    bt.logger.setLevel("WARNING")
    bt.datasets.synthetic(1, size=256)  # warm up imports

    print(f"bt.datasets.synthetic({args.samples}, size=...): median of {args.repeats} runs")
    print(f"{'size':>6} {'cells':>7} {'synthetic wall':>15} {'synthetic cpu':>14} {'layout cpu':>11} {'cpu ratio':>10}")
    for size in args.sizes:
        blank = np.full((3, size, size), 255, dtype=np.uint8)
        runs, base = [], []
        for _ in range(args.repeats):
            runs.append(_timed(lambda s=size: bt.datasets.synthetic(args.samples, size=s)))
            base.append(_timed(lambda b=blank: [image_element(b, f"s{i}", 0.5) for i in range(args.samples)]))
        n_cells = bt.datasets.synthetic(args.samples, size=size)["truth"].n_obs
        wall, cpu = np.median(runs, axis=0)
        base_cpu = np.median(base, axis=0)[1]
        print(f"{size:>6} {n_cells:>7} {wall:>14.2f}s {cpu:>13.2f}s {base_cpu:>10.2f}s {cpu / base_cpu:>9.1f}x")


if __name__ == "__main__":
    main()
