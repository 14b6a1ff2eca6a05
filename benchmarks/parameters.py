"""What two of bitro's user-facing settings change on HER2ST, leave one section out: the genes and the phenotypes.

Each row is one single network (``n_members=1``, otherwise ``bt.tl.fit``'s defaults) per fold, trained on three
of the four bundled sections and scored on the fourth (PCC_gene, log1p CP10k), with the cell features of
``benchmarks/her2st.py`` (its cache, its scaler + PCA and K-means phenotypes fitted on the training sections).

- ``--study genes``: how many genes to train on. ``bt.tl.fit(n_top_genes=n)`` picks the ``n`` most variable genes
  of the training spots; the rows train on the top 100, 250 (the default) and 1000, and are all scored on the
  same genes, the top 100, so the question is "does naming more genes help the genes I care about?". Each row's
  mean over its own genes is printed too (``own``), which is not comparable across rows.
- ``--study clusters``: ``bt.pp.phenotypes(n_clusters=k)`` feeds the cluster loss during training; the rows use
  k = 4, 8 (the default) and 16 K-means phenotypes and ``cluster_weight=0`` (the phenotypes unused), on the 785
  Hist2ST genes.

The folds run one after the other in this process, so every row of a fold sees the same features and the rows
differ only in the setting. Single folds of one configuration move by up to about 0.01 between seeds, so read the
mean over the four folds. Run from the repository root (features cached by ``benchmarks/her2st.py``)::

    python benchmarks/parameters.py --study genes         # 12 networks, about 10 min on one free core
    python benchmarks/parameters.py --study clusters      # 16 networks
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from her2st import SECTIONS, fold_features, load_all  # noqa: E402  (the same data and features as her2st.py)

#: Genes study: the numbers of most variable genes trained on; every row is scored on the first.
GENE_COUNTS = (100, 250, 1000)
#: Clusters study: K-means phenotypes per fold; ``0`` is ``cluster_weight=0`` (8 phenotypes, unused).
CLUSTER_COUNTS = (4, 8, 16, 0)


def run_fold(held: str, study: str, spots, cells, members: int) -> list[tuple]:
    """Rows ``(setting, held-out, PCC_gene on the common genes, PCC_gene on its own genes, fit s)`` of one fold."""
    import bitro as bt
    from bitro._constants import Key
    from bitro.tl._metrics import pcc_gene
    from bitro.tl._targets import dense, select_genes, to_scale

    test = spots.obs[Key.SAMPLE].astype(str).to_numpy() == held
    train_cells = cells.obs[Key.SAMPLE].astype(str).to_numpy() != held
    values = to_scale(dense(spots.X), "cp10k")
    rows = []
    if study == "genes":
        ranked = select_genes(values[~test], spots.var_names, genes=None, n_top_genes=max(GENE_COUNTS))
        table = fold_features(cells, train_cells)
        settings = [(f"n_top_genes={n}", ranked[:n], table, {}) for n in GENE_COUNTS]
        common = ranked[: GENE_COUNTS[0]]
    else:
        genes = bt.datasets.her2st_genes()
        common = genes
        settings = []
        for k in CLUSTER_COUNTS:
            table = fold_features(cells, train_cells, n_phenotypes=k or 8)
            name, extra = (f"n_clusters={k}", {}) if k else ("cluster_weight=0", {"cluster_weight": 0.0})
            settings.append((name, genes, table, extra))
    truth = to_scale(dense(spots.X), "cp10k", spots.var_names.get_indexer(common))[test]
    for name, genes, table, extra in settings:
        t = time.perf_counter()
        model = bt.tl.fit(spots[~test].copy(), cells=table, genes=genes, n_members=members, **extra)
        seconds = time.perf_counter() - t
        held_spots = spots[test].copy()
        bt.tl.predict(model, held_spots, cells=table, coverage="spots")
        pred = held_spots.obsm[Key.PREDICTED]
        own_truth = to_scale(dense(spots.X), "cp10k", spots.var_names.get_indexer(genes))[test]
        rows.append(
            (name, held, pcc_gene(pred[common].to_numpy(), truth), pcc_gene(pred[genes].to_numpy(), own_truth), seconds)
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", choices=["genes", "clusters"], required=True)
    p.add_argument("--held-out", nargs="*", default=list(SECTIONS), help="folds to run")
    p.add_argument("--members", type=int, default=1, help="networks per model (n_members)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args()
    import torch

    import bitro as bt

    torch.set_num_threads(args.threads)
    bt.settings.progress = False
    t0 = time.perf_counter()
    _, spots, cells = load_all(SECTIONS)
    common = f"top {GENE_COUNTS[0]} genes" if args.study == "genes" else "785 genes"
    print(f"{'setting':18} {'held-out':8} {'PCC_gene (' + common + ')':>26} {'own genes':>10} {'fit s':>7}")
    rows = []
    for held in args.held_out:
        for row in run_fold(held, args.study, spots, cells, args.members):
            print(f"{row[0]:18} {row[1]:8} {row[2]:26.3f} {row[3]:10.3f} {row[4]:7.1f}", flush=True)
            rows.append(row)
    print(f"\n| setting | {' | '.join(args.held_out)} | mean ({common}) | mean (own genes) | fit s |")
    print(f"|---|{'---|' * len(args.held_out)}---|---|---|")
    for name in dict.fromkeys(r[0] for r in rows):
        sel = [r for r in rows if r[0] == name]
        folds = " | ".join(f"{r[2]:.3f}" for r in sel)
        mean_c, mean_o, sec = (np.mean([r[i] for r in sel]) for i in (2, 3, 4))
        print(f"| {name} | {folds} | {mean_c:.3f} | {mean_o:.3f} | {sec:.0f} |")
    print(f"\nwall time {time.perf_counter() - t0:.0f} s, {args.threads} torch thread(s), n_members={args.members}")


if __name__ == "__main__":
    main()
