"""When does transfer between bulk and spot pay off? A map over bulk-only slides x spot training data, both directions.

Synthetic cohorts (``bt.datasets.synthetic(n, size=--size, bulk=True, seed=seed)``: every section has spots with
counts and a bulk profile; section ``i`` does not depend on ``n``). Per data seed one cohort is made and split in
order: ``--test`` held-out sections, a pool of spot sections, a pool of bulk-only sections. A grid cell takes the
first ``K`` spot sections (``--spot-slides``; about 21 spots each at the default size) and the first ``B`` bulk-only
sections (``--bulk-slides``), so the cells of the grid are nested (a cell with fewer than two bulk profiles,
``B + K < 2``, has no bulk model and is left out). Cells come from the true nuclei
(``bt.pp.extract_cells``, handcrafted features; the scaler + PCA and the K-means phenotypes are fitted on every
section of the cohort, held-out ones included: unsupervised and transductive, like a user's whole cohort).

- **bulk -> spot**, scored on the held-out sections' spots (log1p CP10k; PCC_gene per held-out section, then the
  mean; PCC_overall over spots): ``scratch`` = ``bt.tl.fit`` on the ``K`` spot sections' spots; each method =
  ``bt.tl.fit(target="bulk")`` on the bulk profiles of the ``B + K`` sections, then ``bt.tl.transfer`` to the ``K``
  sections' spots.
- **spot -> bulk**, scored on the held-out sections' bulk profiles (PCC_overall per section over genes, PCC_gene
  across the held-out sections, JS divergence of the profiles): ``scratch`` = the bulk model above; each method =
  the spot model above fine-tuned on the ``B + K`` bulk profiles.
- ``mean``: the training-mean profile of the same training rows (PCC_gene 0 by construction at spot level).

Methods (``--methods``): ``default`` (``bt.tl.transfer`` with its defaults), ``full`` (every weight) and LoRA
variants ``lora:rank=R,targets=q+v`` (any of ``rank``, ``targets``, ``alpha``, ``lr``). Every fit and fine-tuning runs
``--epochs`` epochs without early stopping (``validation=None``: a cohort of one or two sections has no samples to
spare), ``n_members=1``, ``max_cells=128`` (bulk bags are random subsets of at most 128 cells per step, as a whole
slide's would be), default architecture otherwise (``gene_rank=5``), one torch thread. ``gain`` = method - scratch
on the same cells and seed. ``trained %`` = trained parameters / parameters of the network (from
``config.transfer``); ``adapter KB`` = size of ``save_adapters`` (LoRA weights and the retrained gene head).

The summary gives, per direction and method, the mean gain over the grid (cells and seeds), in how many cells it
gains, and the share of full fine-tuning's gain it keeps over the cells where full fine-tuning gains (``kept %``: the
sum of the method's mean gains over those cells / the sum of full's). The
heatmaps (``--figure``) show the mean PCC_gene gain of ``default`` and ``full`` per cell, one row per direction.

Run from the repository root (one seed per process: about 25-40 min each on 2 busy cores with the defaults)::

    python benchmarks/transfer_map.py
    python benchmarks/transfer_map.py --seeds 0 --bulk-slides 0 16 --spot-slides 1 8 --methods default full
    python benchmarks/transfer_map.py --seeds 0 --csv s0.csv   # then: --from-csv s0.csv s1.csv ... (same --methods)
"""

from __future__ import annotations

import argparse
import ast
import logging
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FIGURE = HERE.parent / "docs" / "_static" / "transfer_map.png"


def parse_method(spec: str) -> dict:
    """``default``, ``full`` or ``lora:key=value,...`` -> keyword arguments of ``bt.tl.transfer``."""
    if spec == "default":
        return {}
    if spec == "full":
        return {"method": "full"}
    name, _, opts = spec.partition(":")
    if name != "lora":
        msg = f"unknown method {spec!r}: use default, full or lora:rank=4,targets=q+v"
        raise SystemExit(msg)
    kw: dict = {"method": "lora"}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        if key == "targets":
            kw["target_modules"] = value.split("+")
        elif key in ("rank", "alpha", "lr"):
            kw[key] = ast.literal_eval(value)
        else:
            msg = f"unknown LoRA option {key!r} in {spec!r}: use rank, alpha, lr or targets"
            raise SystemExit(msg)
    return kw


def csv_path(args, seed: int) -> Path:
    """``--csv`` itself for one seed; with several seeds one file per seed (``name_seedS.csv``)."""
    path = Path(args.csv)
    return path if len(args.seeds) == 1 else path.with_name(f"{path.stem}_seed{seed}{path.suffix}")


def cohort(seed: int, n: int, size: int):
    """Spot table, bulk table and cell table of ``n`` synthetic sections."""
    import bitro as bt
    from bitro._constants import Key

    sdata = bt.datasets.synthetic(n, size=size, seed=seed, bulk=True)
    names = [f"synth{i}" for i in range(n)]
    cells = bt.pp.extract_cells(sdata, shapes_key={s: f"{s}_true_nuclei" for s in names})
    bt.pp.phenotypes(cells, n_clusters=4)
    bt.pp.spatial_graph(cells)
    return sdata[Key.SPOTS_TABLE], sdata["bulk"], cells, names


def run_seed(seed: int, args) -> list[dict]:
    """Every grid cell, direction and method for one data seed."""
    import torch

    import bitro as bt
    from bitro._constants import Key
    from bitro.tl._metrics import js_divergence, pcc_gene, pcc_overall
    from bitro.tl._targets import dense, to_scale

    torch.set_num_threads(args.threads)
    bt.settings.progress = False
    logging.getLogger("bitro").setLevel(logging.WARNING)
    n_spot, n_bulk = max(args.spot_slides), max(args.bulk_slides)
    spots, bulk, cells, names = cohort(seed, args.test + n_spot + n_bulk, args.size)
    test, spot_pool, bulk_pool = names[: args.test], names[args.test : args.test + n_spot], names[args.test + n_spot :]
    s_sample = spots.obs[Key.SAMPLE].astype(str).to_numpy()
    b_sample = bulk.obs[Key.SAMPLE].astype(str).to_numpy()
    s_test, b_test = np.isin(s_sample, test), np.isin(b_sample, test)
    genes = list(map(str, spots.var_names))
    s_truth = to_scale(dense(spots.X), "cp10k")
    b_truth = to_scale(dense(bulk.X), "cp10k")
    fit_kw = {"epochs": args.epochs, "validation": None, "n_members": 1, "max_cells": 128, "seed": seed}
    ft_kw = {"epochs": args.epochs, "validation": None, "seed": seed}

    def predict(model, table, rows):
        sub = table[rows].copy()
        bt.tl.predict(model, sub, cells=cells)
        return sub.obsm[Key.PREDICTED][genes].to_numpy()

    def score_spot(pred):
        truth, sample = s_truth[s_test], s_sample[s_test]
        per_section = [pcc_gene(pred[sample == s], truth[sample == s]) for s in test]
        return {"pcc_gene": float(np.mean(per_section)), "pcc_overall": pcc_overall(pred, truth)}

    def score_bulk(pred):
        truth = b_truth[b_test]
        js = js_divergence(np.expm1(np.clip(pred, 0, None)), np.expm1(truth))
        return {"pcc_gene": pcc_gene(pred, truth), "pcc_overall": pcc_overall(pred, truth), "js": js}

    def timed(f, *a, **kw):
        t = time.perf_counter()
        out = f(*a, **kw)
        return out, time.perf_counter() - t

    rows: list[dict] = []
    spot_models: dict[int, tuple] = {}
    for k in args.spot_slides:
        train_s = np.isin(s_sample, spot_pool[:k])
        spot_model, t_spot = timed(bt.tl.fit, spots[train_s].copy(), cells=cells, **fit_kw)
        spot_models[k] = (spot_model, t_spot, score_spot(predict(spot_model, spots, s_test)))
    for b in args.bulk_slides:
        for k in args.spot_slides:
            cell = {"seed": seed, "bulk_slides": b, "spot_slides": k}
            train_s = np.isin(s_sample, spot_pool[:k])
            train_b = np.isin(b_sample, spot_pool[:k] + bulk_pool[:b])
            cell["spots"] = int(train_s.sum())
            if b + k < 2:  # a bulk model needs two bulk profiles
                continue
            spot_model, t_spot, spot_score = spot_models[k]
            bulk_model, t_bulk = timed(bt.tl.fit, bulk[train_b].copy(), target="bulk", cells=cells, **fit_kw)
            bulk_score = score_bulk(predict(bulk_model, bulk, b_test))
            mean_s = np.broadcast_to(s_truth[train_s].mean(0), s_truth[s_test].shape)
            mean_b = np.broadcast_to(b_truth[train_b].mean(0), b_truth[b_test].shape)
            for direction, score, scratch, t_scratch, mean in (
                ("bulk -> spot", score_spot, spot_score, t_spot, score_spot(mean_s)),
                ("spot -> bulk", score_bulk, bulk_score, t_bulk, score_bulk(mean_b)),
            ):
                if direction not in args.directions:
                    continue
                rows.append({**cell, "direction": direction, "method": "mean", **mean, "seconds": 0.0, "share": 0.0})
                rows.append(
                    {
                        **cell,
                        "direction": direction,
                        "method": "scratch",
                        **scratch,
                        "seconds": t_scratch,
                        "share": 100.0,
                    }
                )
                source, target, table, train = (
                    (bulk_model, "spot", spots, train_s)
                    if direction == "bulk -> spot"
                    else (spot_model, "bulk", bulk, train_b)
                )
                test_rows = s_test if target == "spot" else b_test
                for spec in args.methods:
                    tuned, t_ft = timed(
                        bt.tl.transfer, source, table[train].copy(), target, cells=cells, **ft_kw, **parse_method(spec)
                    )
                    info = tuned.config.transfer
                    size = float("nan")
                    if tuned.has_adapters:
                        with tempfile.TemporaryDirectory() as tmp:
                            size = sum(f.stat().st_size for f in tuned.save_adapters(Path(tmp) / "a").iterdir())
                    got = score(predict(tuned, table, test_rows))
                    rows.append(
                        {
                            **cell,
                            "direction": direction,
                            "method": spec,
                            **got,
                            "gain": got["pcc_gene"] - scratch["pcc_gene"],
                            "seconds": t_ft,
                            "share": 100 * info["n_trained"] / info["n_parameters"],
                            "adapter_kb": size / 1024,
                        }
                    )
            if args.csv:  # written as the grid goes, so a long run can be summarised part way
                import pandas as pd

                pd.DataFrame(rows).to_csv(csv_path(args, seed), index=False)
            print(f"seed {seed}: {b} bulk-only x {k} spot sections done", flush=True)
    return rows


def summarise(rows: list[dict], args) -> None:
    import pandas as pd

    df = pd.DataFrame(rows)
    for column in ("js", "gain", "adapter_kb"):  # absent when only bulk -> spot (js) or no method ran
        if column not in df:
            df[column] = np.nan
    keys = ["direction", "bulk_slides", "spot_slides", "method"]
    agg = df.groupby(keys, sort=False).agg(
        spots=("spots", "median"),
        pcc_gene=("pcc_gene", "mean"),
        pcc_gene_sd=("pcc_gene", "std"),
        pcc_overall=("pcc_overall", "mean"),
        js=("js", "mean"),
        gain=("gain", "mean"),
        gain_min=("gain", "min"),
        seconds=("seconds", "median"),
        share=("share", "median"),
        adapter_kb=("adapter_kb", "median"),
    )
    print(
        f"\nMean over data seeds {args.seeds} ({len(args.seeds)} cohorts); gain = PCC_gene - scratch (min over seeds)"
    )
    hdr = (
        f"{'direction':13} {'bulk':>4} {'spot sl.':>8} {'spots':>5} {'method':24} {'PCC_gene':>8} {'sd':>5} "
        f"{'PCC_ovr':>7} {'JS':>7} {'gain':>6} {'(min)':>6} {'train s':>7} {'trained %':>9} {'adapter KB':>10}"
    )
    print(hdr)
    for (direction, b, k, method), r in agg.iterrows():
        js = f"{r.js:7.4f}" if direction == "spot -> bulk" else f"{'':7}"
        gain = f"{r.gain:6.3f} {r.gain_min:6.3f}" if np.isfinite(r.gain) else f"{'':13}"
        kb = f"{r.adapter_kb:10.1f}" if np.isfinite(r.adapter_kb) else f"{'':10}"
        print(
            f"{direction:13} {b:4d} {k:8d} {int(r.spots):5d} {method:24} {r.pcc_gene:8.3f} {r.pcc_gene_sd:5.3f} "
            f"{r.pcc_overall:7.3f} {js} {gain} {r.seconds:7.1f} {r.share:9.1f} {kb}"
        )
    print(
        "\nGain over the grid: mean over grid cells (and seeds) of PCC_gene - scratch; where full fine-tuning gains "
        "(mean over seeds > 0), the share of its gain the method keeps (sum over those cells)"
    )
    print(
        f"{'direction':13} {'method':44} {'mean gain':>9} {'cells > 0':>9} {'full gains in':>13} {'kept %':>7} "
        f"{'trained %':>9}"
    )
    means = agg.reset_index()
    for direction in dict.fromkeys(means["direction"]):
        d = means[means["direction"] == direction]
        full = d[d["method"] == "full"].set_index(["bulk_slides", "spot_slides"])["gain"]
        helped = full.index[full > 0]
        for method in [m for m in args.methods if m in set(d["method"])]:
            m = d[d["method"] == method].set_index(["bulk_slides", "spot_slides"])["gain"]
            kept = 100 * m.loc[helped].sum() / full.loc[helped].sum() if len(helped) else float("nan")
            share = d.loc[d["method"] == method, "share"].median()
            print(
                f"{direction:13} {method:44} {m.mean():9.3f} {int((m > 0).sum()):>4d} / {len(m):<2d} "
                f"{len(helped):>7d} cells {kept:7.1f} {share:9.1f}"
            )
    if args.figure:
        heatmaps(means, args)


def heatmaps(means, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in ("default", "full") if m in args.methods] or args.methods[:2]
    directions = list(dict.fromkeys(means["direction"]))
    fig, axs = plt.subplots(
        len(directions), len(methods), figsize=(4.2 * len(methods), 3.6 * len(directions)), squeeze=False
    )
    lim = float(np.nanmax(np.abs(means["gain"]))) or 1.0
    for i, direction in enumerate(directions):
        for j, method in enumerate(methods):
            d = means[(means["direction"] == direction) & (means["method"] == method)]
            grid = d.pivot(index="bulk_slides", columns="spot_slides", values="gain").sort_index(ascending=False)
            spots = d.groupby("spot_slides")["spots"].median()
            ax = axs[i, j]
            im = ax.imshow(grid.to_numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_xticks(range(grid.shape[1]), [f"{k}\n({int(spots[k])})" for k in grid.columns])
            ax.set_yticks(range(grid.shape[0]), grid.index)
            for (y, x), v in np.ndenumerate(grid.to_numpy()):
                ax.text(x, y, f"{v:+.2f}" if np.isfinite(v) else "n/a", ha="center", va="center", fontsize=9)
            ax.set_xlabel("spot training sections (spots)")
            ax.set_ylabel("bulk-only sections")
            ax.set_title(f"{direction}, {method}: PCC_gene gain")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="PCC_gene gain over scratch")
    fig.tight_layout()
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=110)
    print(f"\nheatmaps: {args.figure}")


def cost_table() -> None:
    """Trained share and adapter size of LoRA against rank, targets and ``train_genes`` (no training needed)."""
    import torch

    from bitro.tl._adapters import adapter_names, add_lora, count_trained
    from bitro.tl.models._bitro import BitroArchitecture, BitroNet

    ranks = (2, 4, 8, 16)
    targets = {"all": ["in_proj", "q", "k", "v", "o", "ff1", "ff2"], "in_proj+q+v": ["in_proj", "q", "v"], "q+v": ["q", "v"]}
    print("\nLoRA cost by rank: trained % of the parameters (adapter file KB, float32), default network (dim 64,")
    print("43 cell features); 'all' targets = in_proj, q, k, v, o, ff1, ff2; train_genes='new' with no new gene")
    print(
        f"{'genes':>5} {'gene_rank':>9} {'targets':>11} {'train_genes':>11} "
        + " ".join(f"{'rank ' + str(r):>15}" for r in ranks)
    )
    for n_genes in (60, 785):
        for gene_rank in (5, 0):
            arch = BitroArchitecture.for_data(n_features=43, n_genes=n_genes, bag_sizes=[1.0, 2.0], gene_rank=gene_rank)
            for name, modules in targets.items():
                for train_genes in ("all", "new"):
                    cells = []
                    for rank in ranks:
                        net = BitroNet(arch)
                        lora = {"rank": rank, "alpha": 2.0 * rank, "dropout": 0.0, "target_modules": modules}
                        add_lora(
                            net, lora, train_genes=train_genes, new_rows=torch.zeros(n_genes, dtype=torch.bool), seed=0
                        )
                        n_trained, n_total = count_trained(net, train_genes, torch.zeros(n_genes, dtype=torch.bool))
                        state = net.state_dict()
                        kb = sum(state[k].numel() for k in adapter_names(net, train_genes)) * 4 / 1024
                        cells.append(f"{100 * n_trained / n_total:5.1f}% ({kb:5.1f})")
                    print(
                        f"{n_genes:5d} {gene_rank:9d} {name:>11} {train_genes:>11} "
                        + " ".join(f"{c:>15}" for c in cells)
                    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bulk-slides", nargs="*", type=int, default=[0, 4, 16, 64], help="bulk-only sections (grid rows)")
    p.add_argument("--spot-slides", nargs="*", type=int, default=[1, 2, 8, 16], help="spot sections (grid columns)")
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="data seeds (one cohort each)")
    p.add_argument("--test", type=int, default=6, help="held-out sections per cohort")
    p.add_argument("--size", type=int, default=1024, help="section image edge (pixels at 0.5 um)")
    p.add_argument("--epochs", type=int, default=20, help="epochs of every fit and fine-tuning")
    p.add_argument("--methods", nargs="*", default=["default", "full"], help="default, full, lora:rank=4,targets=q+v")
    p.add_argument(
        "--directions",
        nargs="*",
        default=["bulk -> spot", "spot -> bulk"],
        choices=["bulk -> spot", "spot -> bulk"],
        help="directions to measure (both by default)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument("--jobs", type=int, default=1, help="data seeds run in parallel")
    p.add_argument("--figure", default=str(FIGURE), help="where to write the heatmaps ('' for none)")
    p.add_argument("--csv", default="", help="write every row (seed, cell, direction, method) to this CSV (one file per seed with several seeds)")
    p.add_argument(
        "--skip-full", action="store_true", help="no full fine-tuning (rows to join others' with --from-csv)"
    )
    p.add_argument("--cost-only", action="store_true", help="print only the LoRA cost table (no training)")
    p.add_argument("--from-csv", nargs="*", default=[], help="summarise rows written by --csv instead of running")
    args = p.parse_args()
    for spec in args.methods:
        parse_method(spec)
    if "full" not in args.methods and not args.skip_full:
        args.methods.append("full")
    if args.cost_only:
        cost_table()
        return
    t = time.perf_counter()
    print(
        f"grid: bulk-only sections {args.bulk_slides} x spot sections {args.spot_slides}, seeds {args.seeds}, "
        f"{args.test} held-out sections, methods {args.methods}, {args.epochs} epochs",
        flush=True,
    )
    if args.from_csv:
        import pandas as pd

        table = pd.concat([pd.read_csv(f) for f in args.from_csv])
        # runs joined for more methods repeat the same scratch and mean rows: keep the first
        table = table.drop_duplicates(["seed", "bulk_slides", "spot_slides", "direction", "method"])
        args.seeds = sorted(set(table["seed"]))
        rows = table.to_dict("records")
    else:
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = [r for out in pool.map(run_seed, args.seeds, [args] * len(args.seeds)) for r in out]
    summarise(rows, args)
    cost_table()
    print(f"\nwall time {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
