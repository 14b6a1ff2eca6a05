"""Leave-one-section-out benchmark of ``bt.tl.fit`` / ``bt.tl.predict`` on the four HER2ST sections.

For each held-out section (B4, C2, C3, C4) and each target scale (``cp10k``: log1p of counts per 10k;
``log1p``: log1p of raw counts), on the 785 Hist2ST genes:

- ``mean``: the training-mean profile (high PCC_overall, no PCC_gene);
- ``ridge``: ridge regression (RidgeCV) on colour statistics of each spot's crop (RGB / HSV / optical
  density: mean, std, 10/50/90th percentiles);
- ``bitro``: the default model;
- with ``--ablations`` (cp10k; add ``--full`` for log1p too): one row per component switched off or swapped
  (no GAT, no Transformer, no context, the paper's shared readout, the per-gene readout of the pooled spot
  (attention shares for cells), cluster loss off, no per-sample centring of
  the targets, no bag-size term) and ``paper``: the paper's variant (shared readout, spot cells only, no
  centring, no bag size).

PCC_overall: mean over spots of the Pearson correlation over genes. PCC_gene: mean over genes of the
Pearson correlation over the held-out section's spots; genes with zero variance in the held-out truth
are left out. Cell features: the weight-free "handcrafted" encoder and the bundled EfficientNet-Lite0
(concatenated raw features), with the scaler + PCA (128) and the K-means phenotypes fitted on the
training sections' cells only. Early stopping holds out one training section; the held-out section is
never looked at during training.

Folds run one after the other (``--threads 2`` uses both cores of a laptop: 831 s for the default run), or in
``--jobs`` processes at once (e.g. ``--jobs 2 --threads 1``); the results do not depend on it. Segmentation and raw cell features are cached in ``benchmarks/_cache/`` (first run: about 30 min on 2 busy
cores). Run from the repository root::

    python benchmarks/her2st.py --threads 2            # default model + baselines on both scales (~14 min)
    python benchmarks/her2st.py --quick                # default model + baselines, cp10k only
    python benchmarks/her2st.py --ablations --set n_members=1   # every ablation row on cp10k (single models)
    python benchmarks/her2st.py --quick --configs bitro "no context" --held-out C2   # one fold, two rows
"""

from __future__ import annotations

import argparse
import ast
import resource
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / "_cache"
SECTIONS = ("B4", "C2", "C3", "C4")
ENCODERS = ("handcrafted", "efficientnet")
ABLATIONS = {
    "bitro": {},
    "no GAT": {"gat_layers": 0},
    "no Transformer": {"transformer_layers": 0},
    "no context": {"context_radius": 0.0},
    "shared readout": {"readout": "shared"},
    "gene readout": {"readout": "gene"},
    "cluster loss off": {"cluster_weight": 0.0},
    "no centring": {"center_samples": False},
    "no bag size": {"bag_size": False},
    "paper": {"readout": "shared", "context_radius": 0.0, "center_samples": False, "bag_size": False},
}


# -- cache -------------------------------------------------------------------------------------------------
def build_cache(section: str) -> Path:
    """Segment one section, extract raw cell features with every encoder, and spot colour statistics."""
    import bitro as bt
    from bitro._constants import Key

    file = CACHE / f"her2st_{section}.npz"
    if file.is_file():
        return file
    CACHE.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    sdata = bt.datasets.her2st([section])
    bt.pp.segment_nuclei(sdata)
    out = {}
    for enc in ENCODERS:
        cells = bt.pp.extract_cells(sdata, encoder=enc, key_added=f"cells_{enc}")
        out[f"raw_{enc}"] = np.asarray(cells.obsm[Key.FEATURES_RAW], np.float32)
        out["xy"] = np.asarray(cells.obsm[Key.SPATIAL])
        spot = cells.obs[Key.SPOT_ID]
        out["spot_id"] = np.asarray(spot.astype(object).where(spot.notna(), "").astype(str), dtype=str)
        out["pixel_size"] = np.array(cells.uns[Key.UNS]["pixel_size"][section])
    spots = sdata[Key.SPOTS_TABLE]
    stats = bt.tl.color_statistics(sdata)
    out["colour"] = stats
    out["colour_spot_id"] = np.asarray(spots.obs[Key.SPOT_ID].astype(str), dtype=str)
    np.savez_compressed(file, **out)
    print(f"cached {section}: {len(out['xy'])} cells in {time.perf_counter() - t:.0f} s", flush=True)
    return file


# -- one fold ---------------------------------------------------------------------------------------------
def load_all(sections):
    """Spot table (all sections, raw counts) and the cell table (raw features, graph) of all sections."""
    import anndata as ad
    import pandas as pd

    import bitro as bt
    from bitro._constants import Key

    sdata = bt.datasets.her2st(list(sections))
    spots = sdata[Key.SPOTS_TABLE]
    parts, colour = [], {}
    for s in sections:
        z = np.load(build_cache(s), allow_pickle=False)
        raw = np.concatenate([z[f"raw_{e}"] for e in ENCODERS], axis=1)
        obs = pd.DataFrame({Key.SAMPLE: s, Key.SPOT_ID: pd.Series(z["spot_id"]).replace("", None).to_numpy()})
        obs.index = [f"{s}_{i}" for i in range(len(obs))]
        a = ad.AnnData(obs=obs)
        a.obsm[Key.FEATURES_RAW] = raw
        a.obsm[Key.SPATIAL] = z["xy"]
        parts.append((a, float(z["pixel_size"])))
        colour.update({(s, sid): v for sid, v in zip(z["colour_spot_id"], z["colour"], strict=True)})
    cells = ad.concat([a for a, _ in parts])
    cells.obs[Key.SAMPLE] = cells.obs[Key.SAMPLE].astype("category")
    cells.uns[Key.UNS] = {"pixel_size": {s: px for s, (_, px) in zip(sections, parts, strict=True)}}
    bt.pp.spatial_graph(cells)
    key = zip(spots.obs[Key.SAMPLE].astype(str), spots.obs[Key.SPOT_ID].astype(str), strict=True)
    spots.obsm["colour"] = np.stack([colour[k] for k in key])
    return spots, cells


def fold_features(cells, train_mask, *, n_components=128, n_phenotypes=8, seed=0):
    """Scaler + PCA (bitro's own, with its extraction record) and K-means phenotypes fitted on the training cells."""
    import pandas as pd
    from sklearn.cluster import KMeans

    from bitro._constants import Key
    from bitro._features import fingerprint
    from bitro._reducer import apply_reducer, fit_reducer

    raw = cells.obsm[Key.FEATURES_RAW]
    reducer = fit_reducer(raw[train_mask], n_components, seed=seed)
    x = apply_reducer(raw, reducer)
    km = KMeans(n_phenotypes, n_init=3, random_state=seed).fit(x[train_mask][::4])
    out = cells.copy()
    out.obsm[Key.FEATURES] = x
    out.obs[Key.PHENOTYPE] = pd.Categorical(km.predict(x))
    record = {
        "encoder": "+".join(ENCODERS),
        "weights_sha256": "",
        "crop_um": 24.0,
        "crop_px": 48,
        "add_morphology": True,
        "n_raw_features": raw.shape[1],
        "reducer": reducer,
        "fitted_on": "training sections",
    }
    out.uns[Key.UNS] = {**out.uns[Key.UNS], Key.EXTRACT_CELLS: {**record, "fingerprint": fingerprint(record)}}
    return out


def metrics(pred, truth):
    from bitro.tl._metrics import pcc_gene, pcc_overall

    return pcc_overall(pred, truth), pcc_gene(pred, truth)


def run_fold(held: str, args: argparse.Namespace) -> list[tuple]:
    """Baselines and the configured models for one held-out section, every scale: rows of results.

    Each row: ``(scale, model, held-out, PCC_overall, PCC_gene, fit seconds, best epoch)``. Runs in a worker
    process with ``--jobs``, so it loads the (cached) data itself.
    """
    import torch
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    import bitro as bt
    from bitro._constants import Key
    from bitro.tl._targets import dense, to_scale

    torch.set_num_threads(args.threads)
    bt.settings.progress = False
    spots, cells = load_all(args.sections)
    genes = bt.datasets.her2st_genes()
    counts = dense(spots.X)
    test = spots.obs[Key.SAMPLE].astype(str).to_numpy() == held
    extra = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.set)}
    fold_cells = fold_features(cells, cells.obs[Key.SAMPLE].astype(str).to_numpy() != held)
    rows = []
    for scale in args.scales:
        truth_all = to_scale(counts, scale)[:, spots.var_names.get_indexer(genes)]
        truth = truth_all[test]
        res = {"mean": np.broadcast_to(truth_all[~test].mean(0), truth.shape)}
        colour = StandardScaler().fit(spots.obsm["colour"][~test])
        ridge = RidgeCV(alphas=np.logspace(-1, 4, 11)).fit(
            colour.transform(spots.obsm["colour"][~test]), truth_all[~test]
        )
        res["ridge"] = ridge.predict(colour.transform(spots.obsm["colour"][test]))
        fit_s, best = {}, {}
        for name in args.configs:
            if scale != "cp10k" and name != "bitro" and not args.full:
                continue
            t = time.perf_counter()
            model = bt.tl.fit(
                spots[~test].copy(), cells=fold_cells, genes=genes, scale=scale, **{**ABLATIONS[name], **extra}
            )
            fit_s[name] = time.perf_counter() - t
            best[name] = model.history[0]["best_epoch"]
            held_spots = spots[test].copy()
            bt.tl.predict(model, held_spots, cells=fold_cells, coverage="spots")  # only the spots are scored
            res[name] = held_spots.obsm[Key.PREDICTED][genes].to_numpy()
        for name, pred in res.items():
            ok = np.isfinite(pred).all(1)
            po, pg = metrics(pred[ok], truth[ok])
            rows.append((scale, name, held, po, pg, fit_s.get(name, 0.0), best.get(name, "-")))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="default model and baselines on cp10k only")
    p.add_argument("--ablations", action="store_true", help="every ablation row (cp10k unless --full)")
    p.add_argument("--full", action="store_true", help="ablations on both scales")
    p.add_argument("--configs", nargs="*", default=None, help=f"subset of {list(ABLATIONS)}")
    p.add_argument("--sections", nargs="*", default=list(SECTIONS))
    p.add_argument("--held-out", nargs="*", default=None, help="folds to run (default: every section)")
    p.add_argument("--jobs", type=int, default=1, help="folds run at once, each in its own process")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument(
        "--set", nargs="*", default=[], help="fit parameters for every bitro row, e.g. epochs=30 validation=None"
    )
    args = p.parse_args()
    args.scales = ["cp10k"] if args.quick or (args.ablations and not args.full) else ["cp10k", "log1p"]
    args.configs = args.configs or (list(ABLATIONS) if args.ablations else ["bitro"])

    t_all = time.perf_counter()
    for s in args.sections:
        build_cache(s)
    t0 = time.perf_counter()
    folds = args.held_out or args.sections
    print(f"{'scale':6} {'model':18} {'held-out':8} {'PCC_overall':>11} {'PCC_gene':>9} {'fit s':>7} {'epoch':>5}")
    rows = []

    def report(fold_rows):
        for scale, name, held, po, pg, sec, best in fold_rows:
            print(f"{scale:6} {name:18} {held:8} {po:11.3f} {pg:9.3f} {sec:7.1f} {best:>5}", flush=True)
        rows.extend(fold_rows)

    if args.jobs > 1 and len(folds) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
            for future in as_completed([pool.submit(run_fold, held, args) for held in folds]):
                report(future.result())
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    else:
        for held in folds:
            report(run_fold(held, args))
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print("\nMean over held-out sections")
    print(f"{'scale':6} {'model':18} {'PCC_overall':>11} {'PCC_gene':>9}")
    for scale in args.scales:
        for name in ["mean", "ridge", *args.configs]:
            sel = [r for r in rows if r[0] == scale and r[1] == name]
            if sel:
                print(f"{scale:6} {name:18} {np.mean([r[3] for r in sel]):11.3f} {np.mean([r[4] for r in sel]):9.3f}")
    print(
        f"\nwall time {time.perf_counter() - t0:.0f} s (features cached; {time.perf_counter() - t_all:.0f} s in all), "
        f"peak RSS {peak_gb:.2f} GB per process, {args.jobs} process(es) x {args.threads} torch thread(s)"
    )


if __name__ == "__main__":
    main()
