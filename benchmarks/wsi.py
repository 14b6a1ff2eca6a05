"""Benchmark whole-slide scale: H&E pyramidal TIFF -> cells -> (optionally) predictions, at growing slide sizes.

Writes tiled, JPEG-compressed pyramidal TIFFs (pixel size in the TIFF resolution tags, as
``bt.io.read_wsi`` reads it) of square slides of growing edge, filled with a bundled HER2ST section
mirrored over and over (synthetic but real-looking tissue, the same density of nuclei at every
size). By default tissue fills 1 of every 4 blocks of 2048 px and the rest is blank glass (``--every``),
like pieces of tissue on a slide. Every tile is generated and compressed on its own, so writing stays
in bounded memory.

Each run of the pipeline is a fresh subprocess, so its peak RSS is the pipeline's own:

    read_wsi -> segment_nuclei -> extract_cells (handcrafted) -> phenotypes -> spatial_graph
    with --model: load_model first, normalize_stain to its reference, extract_cells/phenotypes(reference=model),
    then tl.predict(model, sdata, coverage="tissue"), as bt.predict_slide prepares a new slide

Per stage it records wall time and the peak RSS *of that stage* (the kernel's high-water mark is
reset at the start of each stage by writing 5 to /proc/self/clear_refs; where that is not allowed,
a 50 ms sampling thread stands in). Printed: one table per run set (medians over ``--repeats``),
with cells/s and the ratios of time, cells and peak RSS to the smallest slide.

Run from the repository root::

    python benchmarks/wsi.py                                  # 8192, 16384, 32768 px (67 Mpx .. 1.07 Gpx)
    python benchmarks/wsi.py --sizes 4096 8192 --repeats 3
    python benchmarks/wsi.py --model model_dir                # adds the prediction stage
    python benchmarks/wsi.py --n-jobs 2                       # tiles on 2 local processes
    python benchmarks/wsi.py --dask 2                         # tiles on a LocalCluster of 2 worker processes
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
TILE = 512
#: Edge (px) of the blocks of tissue or glass that the slides are made of.
BLOCK = 2048
STAGES = ("load_model", "read", "segment", "normalize_stain", "extract_cells", "phenotypes", "spatial_graph", "predict")


# --- memory -----------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class StagePeak:
    """Peak RSS of one stage: the kernel's VmHWM after a reset, or a sampling thread where resets are refused."""

    def __init__(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.exact = _status_kb("VmHWM") > 0
        except OSError:
            self.exact = False

    def __enter__(self) -> StagePeak:
        self.peak_kb = 0
        if self.exact:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        else:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_kb = max(self.peak_kb, _status_kb("VmRSS"))

    def __exit__(self, *exc) -> None:
        if self.exact:
            self.peak_kb = _status_kb("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            self.peak_kb = max(self.peak_kb, _status_kb("VmRSS"))

    @property
    def gb(self) -> float:
        return self.peak_kb / 1e6


# --- the slides -------------------------------------------------------------------------------


def _mirror(index: np.ndarray, n: int) -> np.ndarray:
    """Indices into an axis of length ``n`` that repeat it mirrored: 0..n-1, n-1..0, 0..n-1, ..."""
    m = index % (2 * n)
    return np.where(m < n, m, 2 * n - 1 - m)


def _block_mean(rgb: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return rgb
    h, w = rgb.shape[0] // f, rgb.shape[1] // f
    total = np.zeros((h, w, 3), dtype=np.uint32)
    view = rgb[: h * f, : w * f].reshape(h, f, w, f, 3)
    for i in range(f):
        for j in range(f):
            total += view[:, i, :, j]
    return ((total + f * f // 2) // (f * f)).astype(np.uint8)


def write_slide(
    path: Path, edge: int, source: np.ndarray, pixel_size: float, *, every: int = 4, quality: int = 90
) -> dict:
    """Write an ``edge`` x ``edge`` px pyramidal tiled JPEG TIFF of ``source`` mirrored over and over.

    The slide is cut into blocks of :data:`BLOCK` px; block ``(i, j)`` holds tissue (the mirrored
    section) when ``(i + j) % every == 0`` and is blank glass otherwise, like pieces of tissue
    scattered on a slide (``every=1``: tissue everywhere). Every row of blocks holds the same share of
    tissue, so the number of cells grows with the area. Levels halve down to a long edge of 1024 px
    (SubIFDs); the pixel size goes into the resolution tags (pixels per centimetre). Returns the file
    size and the time taken.
    """
    import tifffile

    if edge % TILE:
        raise ValueError(f"edge must be a multiple of {TILE}, got {edge}")
    levels = [edge]
    while levels[-1] > 1024:
        levels.append(levels[-1] // 2)
    t0 = time.perf_counter()

    glass = np.full((TILE, TILE, 3), 242, dtype=np.uint8)

    def tiles(size: int, src: np.ndarray):
        h, w = src.shape[:2]
        block = BLOCK * size // edge  # block edge at this level
        for y0 in range(0, size, TILE):
            ys = _mirror(np.arange(y0, y0 + TILE), h)
            rows = src[ys]
            for x0 in range(0, size, TILE):
                tile = rows[:, _mirror(np.arange(x0, x0 + TILE), w)]
                if block >= TILE:  # whole tiles of glass or tissue
                    yield tile if (y0 // block + x0 // block) % every == 0 else glass
                else:  # coarse levels: a tile holds several blocks
                    by = (np.arange(y0, y0 + TILE) // block)[:, None]
                    bx = (np.arange(x0, x0 + TILE) // block)[None, :]
                    yield np.where(((by + bx) % every == 0)[..., None], tile, glass)

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, size in enumerate(levels):
            src = _block_mean(source, 2**k)
            kwargs = (
                {"subifds": len(levels) - 1, "resolution": (1e4 / pixel_size, 1e4 / pixel_size), "resolutionunit": "CENTIMETER"}
                if k == 0
                else {"subfiletype": 1}
            )
            tw.write(
                tiles(size, src),
                shape=(size, size, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                **kwargs,
            )
    return {"bytes": path.stat().st_size, "write_s": time.perf_counter() - t0}


def load_source(sample: str) -> tuple[np.ndarray, float]:
    """The decoded bundled HER2ST section ``sample`` and its pixel size (um/px)."""
    import bitro as bt
    from bitro.io._lazy_image import decoded

    sdata = bt.datasets.her2st([sample])
    section = bt.io.get_sections(sdata)[0]
    path = ROOT / "src" / "bitro" / "datasets" / "data" / "her2st" / f"{sample}.jpg"
    return np.ascontiguousarray(decoded(path)), float(section.pixel_size)


# --- one run ----------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    """One pipeline run in this (fresh) process: print a JSON line with per-stage time and peak RSS."""
    import bitro as bt
    from bitro._pipeline import normalize_to_model

    bt.settings.progress = False
    client = cluster = None
    if args.dask:
        from dask.distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=args.dask, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    peak = StagePeak()
    result: dict = {"exact_peak": peak.exact, "stages": {}}
    base_kb = _status_kb("VmRSS")

    def stage(name, func):
        t = time.perf_counter()
        with StagePeak() as p:
            out = func()
        result["stages"][name] = {"s": time.perf_counter() - t, "peak_rss_gb": p.gb}
        return out

    t0 = time.perf_counter()
    # with a model, a new slide is prepared as `bt.predict_slide` does: stains normalised to the model's reference,
    # features through its training cells' scaler + PCA, its phenotypes
    model = stage("load_model", lambda: bt.tl.load_model(args.model)) if args.model else None
    sdata = stage("read", lambda: bt.io.read_wsi(args.slide, sample="wsi"))
    stage("segment", lambda: bt.pp.segment_nuclei(sdata, client=client, n_jobs=args.n_jobs))
    image_key = None
    if model is not None:
        sections = {s.sample: s.image_key for s in bt.io.get_sections(sdata)}
        image_key = stage("normalize_stain", lambda: normalize_to_model(sdata, model, sections))
        result["stain_normalised"] = image_key != sections
    cells = stage(
        "extract_cells",
        lambda: bt.pp.extract_cells(
            sdata, image_key=image_key, encoder="handcrafted", reference=model, client=client, n_jobs=args.n_jobs
        ),
    )
    stage("phenotypes", lambda: bt.pp.phenotypes(cells, reference=model))
    stage("spatial_graph", lambda: bt.pp.spatial_graph(cells))
    if model is not None:
        stage("predict", lambda: bt.tl.predict(model, sdata, coverage="tissue"))
    result["wall_s"] = time.perf_counter() - t0
    result["cells"] = int(cells.n_obs)
    result["import_rss_gb"] = base_kb / 1e6
    result["peak_rss_gb"] = max(s["peak_rss_gb"] for s in result["stages"].values())
    result["cpu_s"] = time.process_time()
    if client is not None:
        client.close()
        cluster.close()
    result["children_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    print("RESULT " + json.dumps(result), flush=True)


def run(slide: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(HERE), "--worker", "--slide", str(slide), "--n-jobs", str(args.n_jobs)]
    if args.dask:
        cmd += ["--dask", str(args.dask)]
    if args.model:
        cmd += ["--model", str(args.model)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"run on {slide.name} failed:\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def median(values) -> float:
    return float(np.median(list(values)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--slide", help=argparse.SUPPRESS)
    p.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768], help="slide edges in px (x 512)")
    p.add_argument("--repeats", type=int, default=1, help="runs per size (medians are printed)")
    p.add_argument("--source", default="C2", help="bundled HER2ST section that fills the slides")
    p.add_argument("--model", help="a saved model (bt.tl.load_model) for the optional prediction stage")
    p.add_argument("--n-jobs", type=int, default=1, help="local processes for the tile work")
    p.add_argument("--dask", type=int, default=0, help="run the tiles on a LocalCluster of this many worker processes")
    p.add_argument("--every", type=int, default=4, help="tissue in 1 of this many blocks of 2048 px (1: everywhere)")
    p.add_argument("--tmp", help="folder for the slides (a temporary folder, deleted at the end, by default)")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    tmp = Path(tempfile.mkdtemp(prefix="bitro_wsi_", dir=args.tmp))
    try:
        source, pixel_size = load_source(args.source)
        backend = f"dask LocalCluster({args.dask} processes)" if args.dask else f"n_jobs={args.n_jobs}"
        print(
            f"# Whole-slide scale: HER2ST {args.source} ({source.shape[1]} x {source.shape[0]} px, {pixel_size:.3f} um/px) "
            f"mirrored in 1 of every {args.every} blocks of {BLOCK} px; JPEG q90 tiled ({TILE} px) pyramidal TIFF; "
            f"{backend}; median of {args.repeats}\n",
            flush=True,
        )
        rows = []
        for edge in args.sizes:
            slide = tmp / f"wsi_{edge}.tif"
            info = write_slide(slide, edge, source, pixel_size, every=args.every)
            print(f"wrote {slide.name}: {edge * edge / 1e6:.0f} Mpx, {info['bytes'] / 1e6:.0f} MB in {info['write_s']:.0f} s", flush=True)
            runs = [run(slide, args) for _ in range(args.repeats)]
            rows.append((edge, runs))
            slide.unlink()
            r = runs[0]
            print(
                f"  {r['cells']} cells, {median(x['wall_s'] for x in runs):.0f} s, "
                f"peak {median(x['peak_rss_gb'] for x in runs):.2f} GB; per stage (s, peak GB): "
                + ", ".join(f"{k} {v['s']:.1f} s {v['peak_rss_gb']:.2f} GB" for k, v in r["stages"].items())
                + ("" if r.get("stain_normalised", True) else "; no stain vectors fitted: predicted unnormalised"),
                flush=True,
            )
        del source
        stages = [s for s in STAGES if s in rows[0][1][0]["stages"]]
        print("\n| Mpx | cells | " + " | ".join(f"{s} s" for s in stages) + " | total s | cells/s | peak RSS GB | "
              "time ratio | cells ratio | RSS ratio |")  # fmt: skip
        print("|---" * (len(stages) + 8) + "|")
        base = None
        for edge, runs in rows:
            wall, rss, cells = median(r["wall_s"] for r in runs), median(r["peak_rss_gb"] for r in runs), runs[0]["cells"]
            base = base or (wall, rss, cells)
            per = [median(r["stages"][s]["s"] for r in runs) for s in stages]
            print(
                f"| {edge * edge / 1e6:.0f} | {cells} | " + " | ".join(f"{v:.1f}" for v in per) +
                f" | {wall:.0f} | {cells / wall:.0f} | {rss:.2f} | {wall / base[0]:.2f} | {cells / base[2]:.2f} | "
                f"{rss / base[1]:.2f} |"
            )  # fmt: skip
        print("\nPeak RSS (GB) of each stage (high-water mark reset at the start of the stage):\n")
        print("| Mpx | after imports | " + " | ".join(stages) + " |")
        print("|---" * (len(stages) + 2) + "|")
        for edge, runs in rows:
            per = [median(r["stages"][s]["peak_rss_gb"] for r in runs) for s in stages]
            print(
                f"| {edge * edge / 1e6:.0f} | {median(r['import_rss_gb'] for r in runs):.2f} | "
                + " | ".join(f"{v:.2f}" for v in per) + " |"
            )  # fmt: skip
        if args.n_jobs > 1 or args.dask:
            print("\nLargest worker process peak RSS (GB): " + ", ".join(
                f"{edge * edge / 1e6:.0f} Mpx: {median(r['children_peak_rss_gb'] for r in runs):.2f}" for edge, runs in rows
            ))  # fmt: skip
        exact = all(r["exact_peak"] for _, runs in rows for r in runs)
        print(f"\nPeak RSS measured {'exactly (VmHWM reset per stage)' if exact else 'by 50 ms sampling'}.")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
