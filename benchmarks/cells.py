"""Benchmark the cell table: segmentation + features per section and per encoder.

Each run (one section, one encoder) is a fresh subprocess, so its wall time and peak RSS cover the
whole section: read, segment, extract features. Printed tables:

1. per HER2ST section and encoder: cells, cells/s of segmentation and of features, wall time and
   peak RSS (medians over ``--repeats`` runs);
2. synthetic slides of 2048, 4096 and 8192 px square (4x area each step; read from zarr, so images are
   lazy): time and memory scaling, ratios vs the smallest slide;
3. cells per spot (median, range) and the share of cells inside a spot, per section;
4. which encoder's features predict expression better: ridge on spot-averaged raw features,
   leave-one-section-out, PCC_gene on log1p CP10k of the 785 Hist2ST genes (genes with zero
   variance on the held-out section are left out of the mean).

Run from the repository root::

    python benchmarks/cells.py                       # everything (30-40 min on 2 busy cores)
    python benchmarks/cells.py --sections C2 --encoders handcrafted --repeats 3 --no-synthetic
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

import numpy as np

HERE = Path(__file__).resolve()
SECTIONS = ("B4", "C2", "C3", "C4")
ENCODERS = ("handcrafted", "efficientnet")


def peak_rss_gb() -> float:
    """Peak resident memory of this process (VmHWM: unlike ``ru_maxrss`` it does not inherit the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e6  # kB -> GB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def worker(args: argparse.Namespace) -> None:
    """One run in this process: print a JSON line with timings and peak RSS; save spot-mean features."""
    import bitro as bt
    from bitro._constants import Key

    bt.settings.progress = False
    t0 = time.perf_counter()
    if args.zarr:
        import spatialdata as sd

        sdata = sd.read_zarr(args.zarr)
    else:
        sdata = bt.datasets.her2st([args.section])
    t_read = time.perf_counter() - t0
    t = time.perf_counter()
    bt.pp.segment_nuclei(sdata)
    t_seg = time.perf_counter() - t
    t = time.perf_counter()
    cells = bt.pp.extract_cells(sdata, encoder=args.encoder)
    t_feat = time.perf_counter() - t
    wall = time.perf_counter() - t0
    n = cells.n_obs
    result = {
        "cells": n,
        "read_s": t_read,
        "seg_s": t_seg,
        "feat_s": t_feat,
        "wall_s": wall,
        "peak_rss_gb": peak_rss_gb(),
        "cpu_s": time.process_time(),
    }
    if Key.SPOTS_TABLE in sdata.tables and args.out:
        spot = cells.obs[Key.SPOT_ID]
        inside = spot.notna().to_numpy()
        counts = spot[inside].astype(str).value_counts()
        result |= {
            "in_spot": float(inside.mean()),
            "per_spot_median": float(counts.median()),
            "per_spot_min": int(counts.min()),
            "per_spot_max": int(counts.max()),
            "spots_with_cells": int(len(counts)),
            "spots": int(sdata.tables[Key.SPOTS_TABLE].n_obs),
        }
        ids = counts.index.to_numpy()
        raw = cells.obsm[Key.FEATURES_RAW][inside]
        codes = {s: i for i, s in enumerate(ids)}
        idx = np.array([codes[s] for s in spot[inside].astype(str)])
        mean = np.zeros((len(ids), raw.shape[1]))
        np.add.at(mean, idx, raw)
        mean /= np.bincount(idx, minlength=len(ids))[:, None]
        np.savez(args.out, spot_ids=ids.astype(str), features=mean)
    print("RESULT " + json.dumps(result), flush=True)


def run(extra: list[str]) -> dict:
    out = subprocess.run([sys.executable, str(HERE), "--worker", *extra], capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"run {extra} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def median(runs: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def section_table(sections, encoders, repeats: int, tmp: Path) -> dict:
    print(f"\n## Per section (median of {repeats} run(s); 2 CPU cores; fresh process per run)\n")
    print(
        "| section | encoder | cells | seg cells/s | feature cells/s | seg s | features s | wall s | CPU s | peak RSS GB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = {}
    for section in sections:
        for encoder in encoders:
            npz = tmp / f"{section}_{encoder}.npz"
            runs = [run(["--section", section, "--encoder", encoder, "--out", str(npz)]) for _ in range(repeats)]
            results[section, encoder] = runs[0]
            n = runs[0]["cells"]
            print(
                f"| {section} | {encoder} | {n} | {n / median(runs, 'seg_s'):.0f} | {n / median(runs, 'feat_s'):.0f} | "
                f"{median(runs, 'seg_s'):.1f} | {median(runs, 'feat_s'):.1f} | {median(runs, 'wall_s'):.1f} | "
                f"{median(runs, 'cpu_s'):.1f} | {median(runs, 'peak_rss_gb'):.2f} |",
                flush=True,
            )
    return results


def spot_table(results: dict, sections, encoder: str) -> None:
    print("\n## Cells per spot (cells whose centroid lies in a spot circle)\n")
    print("| section | spots | spots with cells | cells per spot: median | min | max | share of cells in a spot |")
    print("|---|---|---|---|---|---|---|")
    for s in sections:
        r = results[s, encoder]
        print(
            f"| {s} | {r['spots']} | {r['spots_with_cells']} | {r['per_spot_median']:.0f} | {r['per_spot_min']} | "
            f"{r['per_spot_max']} | {r['in_spot']:.3f} |"
        )


def synthetic_table(sizes: list[int], repeats: int, tmp: Path) -> None:
    import bitro as bt

    bt.settings.progress = False
    print(
        f"\n## Synthetic slides of growing area (zarr-backed, handcrafted; median of {repeats}; ratios vs the first)\n"
    )
    print(
        "| size px | Mpx | cells | wall s | CPU s | seg s | features s | peak RSS GB | wall ratio | CPU ratio | RSS ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    base = None
    for s in sizes:
        path = tmp / f"synthetic_{s}.zarr"
        bt.datasets.synthetic(1, size=s, seed=1).write(path, overwrite=True)
        runs = [run(["--zarr", str(path), "--encoder", "handcrafted"]) for _ in range(repeats)]
        wall, cpu, rss = median(runs, "wall_s"), median(runs, "cpu_s"), median(runs, "peak_rss_gb")
        base = base or (wall, cpu, rss)
        print(
            f"| {s} | {s * s / 1e6:.1f} | {runs[0]['cells']} | {wall:.1f} | {cpu:.1f} | {median(runs, 'seg_s'):.1f} | "
            f"{median(runs, 'feat_s'):.1f} | {rss:.2f} | {wall / base[0]:.2f} | {cpu / base[1]:.2f} | {rss / base[2]:.2f} |",
            flush=True,
        )


def prediction_table(sections, encoders, tmp: Path) -> None:
    """Ridge on spot-mean raw features, leave-one-section-out, PCC_gene on log1p CP10k (785 genes)."""
    import pandas as pd
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    import bitro as bt
    from bitro._constants import Key

    spots = bt.datasets.her2st(list(sections)).tables[Key.SPOTS_TABLE]
    genes = bt.datasets.her2st_genes()
    x = spots.X.toarray() if hasattr(spots.X, "toarray") else np.asarray(spots.X)
    lib = x.sum(axis=1, keepdims=True)
    y_all = pd.DataFrame(np.log1p(x / np.maximum(lib, 1) * 1e4), index=spots.obs_names, columns=spots.var_names)[genes]
    sample = spots.obs[Key.SAMPLE].astype(str)
    spot_id = spots.obs[Key.SPOT_ID].astype(str)

    def load(encoder: str):
        frames = []
        for s in sections:
            d = np.load(tmp / f"{s}_{encoder}.npz")
            frames.append(pd.DataFrame(d["features"], index=[f"{s}_{i}" for i in d["spot_ids"]]))
        return pd.concat(frames)

    feats = {e: load(e) for e in encoders}
    if len(encoders) > 1:
        feats[" + ".join(encoders)] = pd.concat([feats[e] for e in encoders], axis=1, join="inner")
    print("\n## Expression from spot-averaged cell features (ridge, leave-one-section-out, log1p CP10k, 785 genes)\n")
    print("| features | dims | " + " | ".join(f"PCC_gene {s}" for s in sections) + " | mean |")
    print("|---|---|" + "---|" * (len(sections) + 1))
    index = pd.Index([f"{s}_{i}" for s, i in zip(sample, spot_id, strict=True)])
    y_all.index = index
    for name, f in feats.items():
        f = f.loc[f.index.intersection(index)]
        y = y_all.loc[f.index].to_numpy()
        fs = f.index.str.split("_").str[0].to_numpy()
        scores = []
        for s in sections:
            train, test = fs != s, fs == s
            scaler = StandardScaler().fit(f.values[train])
            model = RidgeCV(alphas=np.logspace(-1, 5, 13)).fit(scaler.transform(f.values[train]), y[train])
            pred = model.predict(scaler.transform(f.values[test]))
            yt = y[test]
            ok = (yt.std(axis=0) > 0) & (pred.std(axis=0) > 0)
            pc = [np.corrcoef(pred[:, g], yt[:, g])[0, 1] for g in np.flatnonzero(ok)]
            scores.append(float(np.mean(pc)))
        print(f"| {name} | {f.shape[1]} | " + " | ".join(f"{v:.3f}" for v in scores) + f" | {np.mean(scores):.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--section")
    p.add_argument("--zarr")
    p.add_argument("--out")
    p.add_argument("--encoder", default="handcrafted")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS))
    p.add_argument("--encoders", nargs="+", default=list(ENCODERS))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--synthetic-sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--no-synthetic", action="store_true")
    p.add_argument("--only-synthetic", action="store_true")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.only_synthetic:
            synthetic_table(args.synthetic_sizes, args.repeats, tmp)
            return
        results = section_table(args.sections, args.encoders, args.repeats, tmp)
        spot_table(results, args.sections, args.encoders[0])
        if len(args.sections) > 1:
            prediction_table(args.sections, args.encoders, tmp)
        if not args.no_synthetic:
            synthetic_table(args.synthetic_sizes, args.repeats, tmp)


if __name__ == "__main__":
    main()
