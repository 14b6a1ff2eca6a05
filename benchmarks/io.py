"""Benchmark reading one 92-Mpx HER2ST section: bitro's lazy reader against a plain PIL decode.

Every run is a fresh subprocess (cold caches, its own peak RSS). Two scenarios per method:

- ``crops``: open, read a first 2048 x 2048 crop, a second (different) 2048 x 2048 crop, then the
  whole of a coarse pyramid level (bitro: ``scale3``, 1/8; PIL: ``Image.reduce(8)`` of the decoded image);
- ``full``: open and decode the whole full-resolution image into one array.

bitro: ``bt.io.read_st`` (also parses the counts) and the image-only open (header + lazy pyramid);
crops through the ``scale0`` dask array of the SpatialData image. PIL: ``Image.open`` (header), then
``np.asarray(im.crop(...))`` (a JPEG has no random access, so the first crop decodes everything; the
second reuses the loaded image), ``np.asarray(im)`` for the full image. Times are wall clock, plus the
process CPU time (summed over threads; less sensitive to other load on the machine). Peak RSS is
``ru_maxrss`` of the subprocess minus its RSS after the imports. ``decodes`` counts full decodes of
the JPEG (bitro: calls of its decoder; PIL: 1 per loaded image); bitro's coarse levels use reduced
JPEG decodes (DCT scaling), counted apart.

Run from the repository root::

    python benchmarks/io.py                 # B4, 5 runs per cell (about 2 min on 2 cores)
    python benchmarks/io.py --section C2 --repeats 3
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
CROP = 2048
CROP1 = (2000, 3000)  # (x, y) of the first crop's corner
CROP2 = (5500, 6000)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> None:
    """One run in this process; prints one JSON line."""
    from bitro.datasets._her2st import BUNDLED_DIR

    folder = Path(args.folder) if args.folder else BUNDLED_DIR
    jpg = folder / f"{args.section}.jpg"
    out: dict[str, float] = {}
    if args.method == "bitro":
        import dask.array as da

        import bitro as bt
        from bitro.io import _build, _lazy_image

        bt.settings.progress = False
        bt.logger.setLevel("WARNING")
        # one-time costs of the first use in a process (spatialdata's lazy imports, dask's thread pool), not of reading
        warm = _build.pyramid_image_element([da.zeros((3, 8, 8), dtype=np.uint8, chunks=4)], "warmup", 1.0)
        _ = warm["scale0"]["image"][:, :6, :6].values
        decodes = {"full": 0, "reduced": 0}
        decode = _lazy_image._decode

        def counting_decode(path, reduce=1):
            decodes["full" if reduce == 1 else "reduced"] += 1
            return decode(path, reduce)

        _lazy_image._decode = counting_decode
        base = _rss_mb()
        t = time.perf_counter()
        levels = _lazy_image.lazy_rgb_pyramid(jpg, chunk=_build.IMAGE_CHUNK)
        _build.pyramid_image_element(levels, args.section, 0.69)
        out["open_image_s"] = time.perf_counter() - t
        t = time.perf_counter()
        sdata = bt.io.read_st(folder, args.section)
        out["open_s"] = time.perf_counter() - t
        image = sdata[f"{args.section}_image"]
        level0 = image["scale0"]["image"]
        if args.scenario == "crops":
            for key, (x, y) in (("crop1_s", CROP1), ("crop2_s", CROP2)):
                t, c = time.perf_counter(), time.process_time()
                crop = level0[:, y : y + CROP, x : x + CROP].values
                out[key], out[key.replace("_s", "_cpu")] = time.perf_counter() - t, time.process_time() - c
                assert crop.shape == (3, CROP, CROP)
            t = time.perf_counter()
            _ = image["scale3"]["image"].values
            out["coarse_s"] = time.perf_counter() - t
        else:
            t, c = time.perf_counter(), time.process_time()
            full = level0.values
            out["full_s"], out["full_cpu"] = time.perf_counter() - t, time.process_time() - c
            assert full.shape[0] == 3
        out["decodes"], out["reduced_decodes"] = decodes["full"], decodes["reduced"]
    else:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None
        base = _rss_mb()
        t = time.perf_counter()
        im = Image.open(jpg)
        out["open_image_s"] = out["open_s"] = time.perf_counter() - t
        if args.scenario == "crops":
            for key, (x, y) in (("crop1_s", CROP1), ("crop2_s", CROP2)):
                t, c = time.perf_counter(), time.process_time()
                crop = np.asarray(im.crop((x, y, x + CROP, y + CROP)))
                out[key], out[key.replace("_s", "_cpu")] = time.perf_counter() - t, time.process_time() - c
                assert crop.shape == (CROP, CROP, 3)
            t = time.perf_counter()
            np.asarray(im.reduce(8))
            out["coarse_s"] = time.perf_counter() - t
        else:
            t, c = time.perf_counter(), time.process_time()
            full = np.asarray(im)
            out["full_s"], out["full_cpu"] = time.perf_counter() - t, time.process_time() - c
            assert full.shape[2] == 3
        out["decodes"], out["reduced_decodes"] = 1, 0
    out["peak_rss_mb"] = _rss_mb() - base
    print(json.dumps(out))


def run(method: str, scenario: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, str(HERE), "--worker", "--method", method, "--scenario", scenario, "--section", args.section]
    if args.folder:
        cmd += ["--folder", args.folder]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", default="B4")
    p.add_argument("--folder", default=None, help="folder with the section (default: the bundled HER2ST copy)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", choices=["bitro", "pil"], help=argparse.SUPPRESS)
    p.add_argument("--scenario", choices=["crops", "full"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for r in range(args.repeats):  # interleave the methods so that machine load hits both alike
        for method in ("pil", "bitro"):
            for scenario in ("crops", "full"):
                results.setdefault((method, scenario), []).append(run(method, scenario, args))
        print(f"run {r + 1}/{args.repeats} done", file=sys.stderr)

    def med(method: str, scenario: str, key: str) -> float:
        return float(np.median([res[key] for res in results[(method, scenario)]]))

    rows = [
        ("open (image header + lazy pyramid)", "crops", "open_image_s", "s"),
        ("open (read_st: image + spots + counts)", "crops", "open_s", "s"),
        (f"first {CROP}x{CROP} crop", "crops", "crop1_s", "s"),
        (f"second {CROP}x{CROP} crop", "crops", "crop2_s", "s"),
        ("coarse level 1/8 (whole)", "crops", "coarse_s", "s"),
        ("full decode to one array", "full", "full_s", "s"),
        ("CPU time (all threads), first crop", "crops", "crop1_cpu", "s"),
        ("CPU time (all threads), full decode", "full", "full_cpu", "s"),
        ("peak RSS, open + 2 crops + coarse", "crops", "peak_rss_mb", "MB"),
        ("peak RSS, full decode", "full", "peak_rss_mb", "MB"),
        ("full decodes, open + 2 crops + coarse", "crops", "decodes", ""),
        ("reduced (1/8) decodes, same", "crops", "reduced_decodes", ""),
    ]
    print(f"\nSection {args.section} ({args.repeats} runs each, fresh process per run; medians)\n")
    print(f"| {'measure':<40} | {'PIL':>9} | {'bitro':>9} | {'bitro / PIL':>11} |")
    print(f"|{'-' * 42}|{'-' * 11}|{'-' * 11}|{'-' * 13}|")
    for label, scenario, key, unit in rows:
        pil, bit = med("pil", scenario, key), med("bitro", scenario, key)
        if key == "open_s":
            pil = float("nan")  # PIL reads no spots or counts
        fmt = (lambda v, unit=unit: f"{v:.0f} {unit}".strip()) if unit != "s" else (lambda v: f"{v:.3f} s")
        ratio = bit / pil if pil and np.isfinite(pil) else float("nan")
        print(f"| {label:<40} | {fmt(pil) if np.isfinite(pil) else '-':>9} | {fmt(bit):>9} | {ratio:>11.2f} |")


if __name__ == "__main__":
    main()
