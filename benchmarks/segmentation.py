"""Benchmark `bt.pp.segment_nuclei` on one whole 92-Mpx HER2ST section, and draw its overlay figure.

Every run is a fresh subprocess (cold caches, its own peak RSS): read the section with
``bt.io.read_st`` (lazy image), then segment it. Configurations: full resolution or 2x
downsampled, serial or 2 local processes. Reported per configuration: the median wall time of the
segmentation (the JPEG decode included, as the first tile read triggers it), the process CPU time
(self + children; less sensitive to other load on the machine), peak RSS (``ru_maxrss`` of the run
plus that of its largest child), the number of nuclei, and the wall-time ratio to the baseline
(full resolution, serial).

``--figure`` also saves the segmentation outlines on a 600 x 600 px tissue crop of the section to
``docs/_static/segmentation_overlay.png``.

Run from the repository root::

    python benchmarks/segmentation.py                      # C2, 3 runs per configuration
    python benchmarks/segmentation.py --repeats 1 --figure
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
FIGURE = REPO / "docs" / "_static" / "segmentation_overlay.png"
CONFIGS = [  # (downsample, n_jobs); the first is the baseline
    (1, 1),
    (2, 1),
    (1, 2),
    (2, 2),
]
CROP = (5000, 5000, 600)  # x0, y0, size of the overlay crop (full-resolution pixels)


def worker(args: argparse.Namespace) -> None:
    """One segmentation in this process; prints one JSON line."""
    import bitro as bt
    from bitro.datasets._her2st import BUNDLED_DIR

    bt.settings.progress = False
    bt.logger.setLevel("WARNING")
    sdata = bt.io.read_st(Path(args.folder) if args.folder else BUNDLED_DIR, args.section)
    cpu0, t0 = time.process_time(), time.perf_counter()
    bt.pp.segment_nuclei(sdata, downsample=args.downsample, n_jobs=args.n_jobs)
    wall = time.perf_counter() - t0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - cpu0 + children.ru_utime + children.ru_stime
    cells = sdata.shapes[bt.Key.cells(args.section)]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + children.ru_maxrss
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": rss / 1024, "n_cells": len(cells)}))
    if args.figure:
        overlay(sdata, args.section, FIGURE)


def overlay(sdata, section: str, path: Path) -> None:
    """Segmentation outlines (yellow) on a tissue crop of the section."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import shapely

    from bitro._utils import scale0

    x0, y0, n = CROP
    crop = scale0(sdata.images[f"{section}_image"]).isel(y=slice(y0, y0 + n), x=slice(x0, x0 + n)).values
    cells = sdata.shapes[f"{section}_cells"]
    cells = cells[cells.intersects(shapely.box(x0, y0, x0 + n, y0 + n))]
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(crop.transpose(1, 2, 0), extent=(x0, x0 + n, y0 + n, y0))
    for polygon in cells.geometry:
        xy = shapely.get_coordinates(polygon.exterior)
        ax.plot(xy[:, 0], xy[:, 1], color="yellow", lw=0.6)
    ax.set(xlim=(x0, x0 + n), ylim=(y0 + n, y0), title=f"HER2ST {section}: bt.pp.segment_nuclei ({len(cells)} nuclei)")
    ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"saved {path}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", default="C2")
    parser.add_argument("--folder", default=None, help="HER2ST folder (default: the sections bundled in bitro)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--figure", action="store_true", help="save the overlay figure (from the first run)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--downsample", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--n-jobs", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    rows = []
    for i, (downsample, n_jobs) in enumerate(CONFIGS):
        runs = []
        for r in range(args.repeats):
            cmd = [sys.executable, str(HERE), "--worker", "--section", args.section]
            cmd += ["--downsample", str(downsample), "--n-jobs", str(n_jobs)]
            cmd += ["--folder", args.folder] if args.folder else []
            cmd += ["--figure"] if args.figure and i == 0 and r == 0 else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        rows.append((downsample, n_jobs, {k: float(np.median([run[k] for run in runs])) for k in runs[0]}))
    base = rows[0][2]["wall_s"]
    print(f"section {args.section}, median of {args.repeats} run(s) per row, fresh process per run")
    header = ("downsample", "n_jobs", "wall s", "cpu s", "peak RSS MB", "nuclei", "vs base")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (10, 6, 8, 8, 11, 7, 7), strict=True)))
    for downsample, n_jobs, m in rows:
        print(
            f"{downsample:>10} {n_jobs:>6} {m['wall_s']:>8.1f} {m['cpu_s']:>8.1f} {m['peak_rss_mb']:>11.0f} "
            f"{m['n_cells']:>7.0f} {m['wall_s'] / base:>7.2f}"
        )


if __name__ == "__main__":
    main()
