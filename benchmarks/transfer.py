"""Does transfer learning between the bulk and spot levels help? ``bt.tl.transfer`` on the four HER2ST sections.

Leave-one-section-out (B4, C2, C3, C4), 785 Hist2ST genes, target scale cp10k (log1p of counts per 10k).
Bulk samples are pseudo-bulk (``bt.tl.pseudobulk``): raw counts summed over ``--block``x``--block`` array blocks
of spots (bag: the cells of those spots) plus one row per whole section (bag: all cells of the section).

Spot level (held-out section's spots; PCC_overall, PCC_gene):
  - ``mean``: training-mean profile;
  - ``spot only``: ``bt.tl.fit`` on the training sections' spots;
  - ``bulk -> spot``: ``bt.tl.fit`` on the training sections' pseudo-bulk, then ``bt.tl.transfer`` (LoRA) to their spots.
  With ``--spot-sections N``, the spots come from the first ``N`` training sections only (in ``SECTIONS`` order;
  tagged ``[N sec]``), the pseudo-bulk still from all of them: little spatial data beside more bulk.
Bulk level (held-out section's blocks and whole section; PCC_overall, PCC_gene over its blocks, JS divergence):
  - ``mean``, ``bulk only`` (the bulk model above), ``spot -> bulk`` (the spot-only model fine-tuned with LoRA on the
    training pseudo-bulk).
Also: the share of parameters the fine-tuning trains and its wall time against training from scratch on the same
data (median over folds; ratio = fine-tune / from scratch). The held-out section is never used for training,
early stopping, PCA, phenotypes or normalisation statistics.

Cell features come from the cache of ``benchmarks/her2st.py`` (``benchmarks/_cache/``, built on first use), with
the scaler + PCA and phenotypes fitted per fold on the training cells (``her2st.fold_features``).

Run from the repository root::

    python benchmarks/transfer.py                     # 4 folds, LoRA, single models (--seeds 3: ensembles)
    python benchmarks/transfer.py --methods lora full --epochs 30 --ft-epochs 10 --sections C2 C3
    python benchmarks/transfer.py --spot-sections 1 3 --methods lora full   # little spot data: 1 training section
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="*", default=["B4", "C2", "C3", "C4"], help="held-out sections (folds)")
    p.add_argument(
        "--methods",
        nargs="*",
        default=["lora"],
        help="transfer methods: lora, full, lora:new (train only new genes' heads)",
    )
    p.add_argument("--epochs", type=int, default=40, help="most epochs of every fit and fine-tuning (early stopping)")
    p.add_argument("--ft-epochs", type=int, default=None, help="most epochs of fine-tuning (default: --epochs)")
    p.add_argument("--block", type=int, default=3, help="pseudo-bulk block side (array positions)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: bt.tl.transfer's)")
    p.add_argument(
        "--spot-sections",
        nargs="*",
        type=int,
        default=[3],
        help="spot training sections of each fold (the first N of the training sections, in SECTIONS order)",
    )
    p.add_argument("--seeds", type=int, default=1, help="ensemble size of every fit (each member is fine-tuned)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args()

    import torch
    from her2st import SECTIONS, build_cache, fold_features, load_all

    import bitro as bt
    from bitro._constants import Key
    from bitro.tl._metrics import js_divergence, pcc_gene, pcc_overall
    from bitro.tl._targets import dense, to_scale

    torch.set_num_threads(args.threads)
    bt.settings.progress = False
    for s in SECTIONS:
        build_cache(s)
    t_all = time.perf_counter()
    _, spots, cells = load_all(SECTIONS)
    genes = bt.datasets.her2st_genes()
    bulk = bt.tl.pseudobulk(spots, block_size=args.block)
    s_sample = spots.obs[Key.SAMPLE].astype(str).to_numpy()
    b_sample = bulk.obs[Key.SAMPLE].astype(str).to_numpy()
    gi = spots.var_names.get_indexer(genes)
    s_truth = to_scale(dense(spots.X), "cp10k")[:, gi]
    b_truth = to_scale(dense(bulk.X), "cp10k")[:, gi]
    is_block = (bulk.obs[Key.BLOCK] != "section").to_numpy()
    fit_kw = {"genes": genes, "epochs": args.epochs, "n_members": args.seeds}
    # rows whose bag has cells: every model is scored on these (the held-out section's spots / blocks with cells)
    with_cells = set(zip(cells.obs[Key.SAMPLE].astype(str), cells.obs[Key.SPOT_ID].astype(str), strict=True))
    s_ok = np.array([k in with_cells for k in zip(s_sample, spots.obs[Key.SPOT_ID].astype(str), strict=True)])
    b_ok = np.array(
        [
            not ids or any((s, i) in with_cells for i in ids.split(Key.SPOT_IDS_SEP))
            for s, ids in zip(b_sample, bulk.obs[Key.SPOT_IDS].astype(str), strict=True)
        ]
    )
    print(
        f"{spots.n_obs} spots, {bulk.n_obs} pseudo-bulk rows ({int(is_block.sum())} blocks of <= {args.block}x{args.block} "
        f"spots + {int((~is_block).sum())} sections), {cells.n_obs} cells, {len(genes)} genes, epochs <= {args.epochs} "
        f"(fine-tuning <= {args.ft_epochs or args.epochs})",
        flush=True,
    )

    def predict(model, table, rows, fold_cells):
        sub = table[rows].copy()
        bt.tl.predict(model, sub, cells=fold_cells)
        return sub.obsm[Key.PREDICTED][genes].to_numpy()

    def timed(f, **kw):
        t = time.perf_counter()
        out = f(**kw)
        return out, time.perf_counter() - t

    spot_rows, bulk_rows, cost = [], [], []
    hdr = f"{'level':5} {'model':30} {'held-out':8} {'PCC_overall':>11} {'PCC_gene':>9} {'JS':>7} {'train s':>8} {'trained %':>9}"
    print(hdr, flush=True)
    for held in args.sections:
        fold_cells = fold_features(cells, cells.obs[Key.SAMPLE].astype(str).to_numpy() != held)
        s_test, b_test = s_sample == held, b_sample == held
        s_train, b_train = spots[~s_test].copy(), bulk[~b_test].copy()

        def score_spot(name, pred, sec, share, held=held, s_test=s_test):
            ok = s_ok[s_test]  # spots with cells (the others have no prediction)
            po, pg = pcc_overall(pred[ok], s_truth[s_test][ok]), pcc_gene(pred[ok], s_truth[s_test][ok])
            spot_rows.append((name, held, po, pg))
            print(f"{'spot':5} {name:30} {held:8} {po:11.3f} {pg:9.3f} {'':>7} {sec:8.1f} {share:9.1f}", flush=True)

        def score_bulk(name, pred, sec, share, held=held, b_test=b_test):
            ok = b_ok[b_test]
            pred, truth = pred[ok], b_truth[b_test][ok]
            po, js = pcc_overall(pred, truth), js_divergence(np.expm1(np.clip(pred, 0, None)), np.expm1(truth))
            blk = is_block[b_test][ok]
            pg = pcc_gene(pred[blk], truth[blk])
            bulk_rows.append((name, held, po, pg, js))
            print(f"{'bulk':5} {name:30} {held:8} {po:11.3f} {pg:9.3f} {js:7.4f} {sec:8.1f} {share:9.1f}", flush=True)

        score_spot("mean", np.broadcast_to(s_truth[~s_test].mean(0), s_truth[s_test].shape), 0.0, 0.0)
        train_sections = [s for s in SECTIONS if s != held]
        spot_models = {}  # spot training sections -> (table, tag, model, seconds)
        for n in sorted(set(args.spot_sections)):
            table = spots[np.isin(s_sample, train_sections[:n])].copy()
            tag = "" if n >= len(train_sections) else f" [{n} sec]"
            # one section has no other to stop early on: a random fifth of its spots instead
            validation = {} if n > 1 else {"validation": 0.2}
            model, t_fit = timed(bt.tl.fit, data=table, target="spot", cells=fold_cells, **fit_kw, **validation)
            score_spot(f"spot only{tag}", predict(model, spots, s_test, fold_cells), t_fit, 100.0)
            spot_models[n] = (table, tag, model, t_fit, validation)
        s_train, _, spot_model, t_spot, _ = spot_models[max(spot_models)]
        bulk_model, t_bulk = timed(bt.tl.fit, data=b_train, target="bulk", cells=fold_cells, **fit_kw)
        score_bulk("mean", np.broadcast_to(b_truth[~b_test & is_block].mean(0), b_truth[b_test].shape), 0.0, 0.0)
        score_bulk("bulk only", predict(bulk_model, bulk, b_test, fold_cells), t_bulk, 100.0)
        for method in args.methods:
            m, _, train_genes = method.partition(":")
            kw = {"method": m, "train_genes": train_genes or "all", "epochs": args.ft_epochs or args.epochs}
            if args.rank is not None and m == "lora":
                kw["rank"] = args.rank
            for table, tag, _, t_fit, validation in spot_models.values():
                tuned, t_ft = timed(
                    bt.tl.transfer, model=bulk_model, data=table, target="spot", cells=fold_cells, **kw, **validation
                )
                info = tuned.config.transfer
                share = 100 * info["n_trained"] / info["n_parameters"]
                score_spot(f"bulk -> spot {method}{tag}", predict(tuned, spots, s_test, fold_cells), t_ft, share)
                cost.append(
                    ("bulk -> spot", method + tag, held, t_ft, t_fit, share, info["n_trained"], info["n_parameters"])
                )
            tuned, t_ft = timed(bt.tl.transfer, model=spot_model, data=b_train, target="bulk", cells=fold_cells, **kw)
            info = tuned.config.transfer
            share = 100 * info["n_trained"] / info["n_parameters"]
            score_bulk(f"spot -> bulk {method}", predict(tuned, bulk, b_test, fold_cells), t_ft, share)
            cost.append(("spot -> bulk", method, held, t_ft, t_bulk, share, info["n_trained"], info["n_parameters"]))

    print("\nSpot level, mean over held-out sections")
    print(f"{'model':30} {'PCC_overall':>11} {'PCC_gene':>9}")
    for name in dict.fromkeys(r[0] for r in spot_rows):
        sel = [r for r in spot_rows if r[0] == name]
        print(f"{name:30} {np.mean([r[2] for r in sel]):11.3f} {np.mean([r[3] for r in sel]):9.3f}")
    print("\nBulk level (blocks + section of the held-out section), mean over held-out sections")
    print(f"{'model':30} {'PCC_overall':>11} {'PCC_gene':>9} {'JS':>7}")
    for name in dict.fromkeys(r[0] for r in bulk_rows):
        sel = [r for r in bulk_rows if r[0] == name]
        print(
            f"{name:30} {np.mean([r[2] for r in sel]):11.3f} {np.mean([r[3] for r in sel]):9.3f} {np.mean([r[4] for r in sel]):7.4f}"
        )
    print("\nFine-tuning cost vs training from scratch on the same data (median over folds)")
    print(
        f"{'direction':14} {'method':16} {'fine-tune s':>11} {'scratch s':>10} {'ratio':>6} {'trained':>9} {'of':>8} {'share %':>8}"
    )
    for direction, method in dict.fromkeys((c[0], c[1]) for c in cost):
        sel = [c for c in cost if c[0] == direction and c[1] == method]
        ft, sc = np.median([c[3] for c in sel]), np.median([c[4] for c in sel])
        print(
            f"{direction:14} {method:16} {ft:11.1f} {sc:10.1f} {ft / sc:6.2f} {sel[0][6]:9d} {sel[0][7]:8d} {sel[0][5]:8.1f}"
        )
    print(f"\nwall time {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
