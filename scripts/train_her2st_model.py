"""Train the ready model shipped with bitro (``bt.tl.load_model("her2st")``) and score it leave-one-section-out.

What it does, on the four HER2ST sections bundled with the package (``bt.datasets.her2st()``):

1. prepares the cells exactly as ``bitro demo`` does (``bitro._pipeline.cell_table``: nucleus segmentation on the
   original images, Macenko stain normalisation, the weight-free ``"handcrafted"`` encoder, scaler + PCA (128),
   8 K-means phenotypes, kNN graph), all sections together;
2. fits a spot model on all four sections with the default ``bt.tl.fit`` settings on the demo's genes
   (``bt.datasets.her2st_genes()`` + ERBB2, EPCAM) and saves it to ``--out``;
3. runs leave-one-section-out with the same settings (the scaler + PCA and the phenotypes refitted on the training
   sections' cells of each fold, so nothing is learnt from the held-out section), scores every gene on the
   held-out spots (Pearson over spots) beside the training-mean profile and ridge regression on patch colour,
   writes the per-gene table ``loso_scores.csv`` next to the model and stores, per gene, the mean over folds in
   ``config.json["gene_scores"]`` (``loso_pcc``, ``loso_pcc_ridge``), which ``bt.tl.predict`` copies into ``.var``.

Run from the repository root (about 25 min on 2 CPU cores)::

    python scripts/train_her2st_model.py                       # -> src/bitro/datasets/models/her2st/
    python scripts/train_her2st_model.py --out /tmp/her2st --threads 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "src" / "bitro" / "datasets" / "models" / "her2st"
SEED = 0


def log(msg: str) -> None:
    """Print a time-stamped progress line."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def per_gene_scores(sdata, cells, genes: list[str], scale: str, folds: list[str]) -> pd.DataFrame:
    """Leave-one-section-out: per fold and gene, the PCC over the held-out spots of bitro, mean profile and ridge."""
    import bitro as bt
    from bitro._constants import Key
    from bitro.tl._baselines import ridge_predict
    from bitro.tl._cross_validate import _fold_cells
    from bitro.tl._metrics import pcc_per_gene
    from bitro.tl._targets import dense, to_scale

    spots = sdata[Key.SPOTS_TABLE]
    colour = bt.tl.color_statistics(sdata)
    truth_all = to_scale(dense(spots.X), scale)[:, spots.var_names.get_indexer(genes)]
    sample = spots.obs[Key.SAMPLE].astype(str).to_numpy()
    cell_sample = cells.obs[Key.SAMPLE].astype(str).to_numpy()
    n_clusters = int(cells.uns[Key.UNS][Key.PHENOTYPES]["n_clusters"])
    rows = []
    for held in folds:
        t = time.perf_counter()
        test = sample == held
        fold_cells = _fold_cells(cells, cell_sample != held, n_clusters, SEED)
        model = bt.tl.fit(spots[~test].copy(), target="spot", cells=fold_cells, genes=genes, scale=scale, seed=SEED)
        held_spots = spots[test].copy()
        bt.tl.predict(model, held_spots, cells=fold_cells, coverage="spots")
        pred = held_spots.obsm[Key.PREDICTED][genes].to_numpy()
        ok = np.isfinite(pred).all(1)
        truth = truth_all[test][ok]
        preds = {
            "bitro": pred[ok],
            "mean": np.broadcast_to(truth_all[~test].mean(0), truth.shape),
            "ridge": ridge_predict(colour[~test], truth_all[~test], colour[test])[ok],
        }
        for method, p in preds.items():
            r = pcc_per_gene(p, truth)
            rows += [{"held_out": held, "method": method, "gene": g, "pcc": v} for g, v in zip(genes, r, strict=True)]
        summary = ", ".join(
            f"{m} {np.nanmean([x['pcc'] for x in rows if x['held_out'] == held and x['method'] == m]):.3f}"
            for m in preds
        )
        log(
            f"fold {held}: {ok.sum()} of {test.sum()} spots predicted; mean PCC_gene {summary} "
            f"({time.perf_counter() - t:.0f} s, best epochs {[h['best_epoch'] for h in model.history]})"
        )
    return pd.DataFrame(rows)


def main() -> None:
    """Train, save and score the model."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="Model folder to write.")
    p.add_argument("--threads", type=int, default=2, help="Torch threads.")
    p.add_argument("--n-jobs", type=int, default=None, help="Local processes for the image work.")
    p.add_argument("--no-loso", action="store_true", help="Skip the leave-one-section-out scores.")
    p.add_argument("--loso-only", action="store_true", help="Skip the fit: only the leave-one-section-out folds.")
    p.add_argument(
        "--folds",
        nargs="*",
        default=None,
        help="Held-out sections to run (default: all); e.g. two "
        "processes with --loso-only --threads 1 --folds B4 C2 / C3 C4, then --merge-only.",
    )
    p.add_argument("--merge-only", action="store_true", help="Only merge the finished folds into --out.")
    p.add_argument("--card-only", action="store_true", help="Only rewrite the tables of MODEL_CARD.md in --out.")
    p.add_argument(
        "--work",
        default=str(ROOT / "benchmarks" / "_cache" / "her2st_model_loso"),
        help="Folder for the per-fold scores (kept, so an interrupted run resumes).",
    )
    args = p.parse_args()

    import torch

    import bitro as bt
    from bitro import _pipeline
    from bitro._constants import Key

    out, work = Path(args.out), Path(args.work)
    if args.card_only:
        write_card_tables(out)
        return
    if args.merge_only:
        merge_folds(work, out)
        return
    torch.set_num_threads(args.threads)
    bt.settings.progress = False
    t0 = time.perf_counter()
    sdata = bt.datasets.her2st()
    samples = [s.sample for s in bt.io.get_sections(sdata)]
    _pipeline.cell_table(sdata, n_jobs=args.n_jobs)
    cells, spots = sdata[Key.CELLS_TABLE], sdata[Key.SPOTS_TABLE]
    log(f"cell table: {cells.n_obs} cells of sections {samples} in {time.perf_counter() - t0:.0f} s")

    genes = [g for g in dict.fromkeys([*bt.datasets.her2st_genes(), *_pipeline.DEMO_GENES]) if g in spots.var_names]
    if not args.loso_only:
        t = time.perf_counter()
        model = fit_and_save(spots, cells, genes, samples, out, sdata)
        log(
            f"fitted on {spots.n_obs} spots x {len(genes)} genes in {time.perf_counter() - t:.0f} s: {model!r} -> {out}"
        )
    if args.no_loso:
        return
    work.mkdir(parents=True, exist_ok=True)
    for held in args.folds or samples:
        file = work / f"{held}.csv"
        if not file.is_file():
            per_gene_scores(sdata, cells, genes, "cp10k", [held]).to_csv(file, index=False)
    if all((work / f"{s}.csv").is_file() for s in samples) and (out / "config.json").is_file():
        merge_folds(work, out)
    log(f"done in {time.perf_counter() - t0:.0f} s")


def merge_folds(work: Path, out: Path) -> None:
    """Merge the per-fold scores into ``loso_scores.csv``, ``config.json["gene_scores"]`` and the model card."""
    config = json.loads((out / "config.json").read_text())
    samples = config["training_data"]["sections"]
    missing = [s for s in samples if not (work / f"{s}.csv").is_file()]
    if missing:
        msg = f"Folds {missing} have not been run yet (no {work}/<fold>.csv)."
        raise SystemExit(msg)
    scores = pd.concat([pd.read_csv(work / f"{s}.csv") for s in samples], ignore_index=True)
    write_scores(scores, config["genes"], samples, out)
    write_card_tables(out)


def fit_and_save(spots, cells, genes, samples, out, sdata=None):
    """Fit the shipped model on every section with the default settings and save it."""
    import bitro as bt

    model = bt.tl.fit(spots, target="spot", cells=cells, genes=genes, seed=SEED)
    if sdata is not None:  # new slides are normalised to the same stain reference (`bitro predict`)
        from bitro._pipeline import stain_reference_record

        model.config.stain_reference = stain_reference_record(sdata)
    model.config.training_data = {
        "dataset": "HER2ST (Andersson et al., Nat. Commun. 12, 6012, 2021), bundled with bitro",
        "sections": samples,
        "n_spots": int(spots.n_obs),
        "n_cells": int(cells.n_obs),
        "script": "scripts/train_her2st_model.py",
        "cells": "bitro._pipeline.cell_table: segment_nuclei, normalize_stain('macenko'), extract_cells('handcrafted'), "
        "phenotypes(8), spatial_graph(8)",
    }
    model.save(out)
    return model


def write_scores(scores: pd.DataFrame, genes, samples, out: Path) -> None:
    """The per-gene table ``loso_scores.csv`` and ``config["gene_scores"]`` (mean over folds per gene)."""
    from bitro.tl._persist import CONFIG_FILE

    table = scores.pivot_table(index="gene", columns=["method", "held_out"], values="pcc", dropna=False)
    table.columns = [f"{m}_{h}" for m, h in table.columns]
    table = table.reindex(genes)
    for m in ("bitro", "mean", "ridge"):
        table[f"{m}_mean"] = table[[f"{m}_{h}" for h in samples]].mean(axis=1)
    table.round(4).to_csv(out / "loso_scores.csv", index_label="gene")
    config = json.loads((out / CONFIG_FILE).read_text())
    config["gene_scores"] = {  # NaN only for a gene constant in every held-out section
        "loso_pcc": [round(float(v), 4) for v in table["bitro_mean"]],
        "loso_pcc_ridge": [round(float(v), 4) for v in table["ridge_mean"]],
    }
    config["gene_scores_protocol"] = (
        f"leave-one-section-out over {samples} with the same settings; per gene, the Pearson correlation over the "
        "held-out section's spots, averaged over the folds (loso_pcc: this model's settings; loso_pcc_ridge: ridge "
        "regression on spot patch colour)"
    )
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    fold_means = scores.groupby(["method", "held_out"])["pcc"].mean().unstack()
    log(f"mean PCC_gene per held-out section:\n{fold_means.round(3)}\nmean over folds:\n{fold_means.mean(1).round(3)}")


#: Markers in MODEL_CARD.md between which :func:`write_card_tables` writes the measured tables.
CARD_BEGIN, CARD_END = "<!-- scores: begin (written by scripts/train_her2st_model.py) -->", "<!-- scores: end -->"


def write_card_tables(out: Path) -> None:
    """Write the measured tables (per fold, thresholds, best and worst genes) into the model card."""
    table = pd.read_csv(out / "loso_scores.csv", index_col="gene")
    folds = sorted({c.split("_", 1)[1] for c in table.columns if c.startswith("bitro_") and c != "bitro_mean"})
    lines = [
        CARD_BEGIN,
        "",
        "| held-out section | bitro | ridge on patch colour | training-mean profile |",
        "|---|---|---|---|",
    ]
    for h in [*folds, "mean"]:
        name = "**mean over folds**" if h == "mean" else h
        lines.append(
            f"| {name} | {table[f'bitro_{h}'].mean():.3f} | {table[f'ridge_{h}'].mean():.3f} | "
            f"{table[f'mean_{h}'].mean():.3f} |"
        )
    score, ridge = table["bitro_mean"], table["ridge_mean"]
    lines += [
        "",
        f"Per gene (mean over the {len(folds)} folds of the PCC over held-out spots), of {len(table)} genes:",
        "",
        "| PCC_gene above | 0.3 | 0.2 | 0.1 | 0 |",
        "|---|---|---|---|---|",
        "| genes (bitro) | " + " | ".join(str(int((score > t).sum())) for t in (0.3, 0.2, 0.1, 0.0)) + " |",
        "| genes (ridge) | " + " | ".join(str(int((ridge > t).sum())) for t in (0.3, 0.2, 0.1, 0.0)) + " |",
        "",
        f"bitro beats the ridge baseline on {int((score > ridge).sum())} of {len(table)} genes.",
        "",
    ]
    per_fold = " | ".join(folds)

    def gene_table(title: str, genes) -> list[str]:
        rows = [
            title,
            "",
            f"| gene | bitro (mean) | ridge (mean) | {per_fold} |",
            "|---|---|---|" + "---|" * len(folds),
        ]
        for g in genes:
            vals = " | ".join(f"{table.loc[g, f'bitro_{h}']:.2f}" for h in folds)
            rows.append(f"| {g} | {score[g]:.3f} | {ridge[g]:.3f} | {vals} |")
        return [*rows, ""]

    order = score.sort_values(ascending=False, na_position="last").index
    lines += gene_table("**The 20 best-predicted genes** (bitro per held-out section on the right):", order[:20])
    lines += gene_table("**The 20 worst-predicted genes:**", order[-20:][::-1])
    demo = [g for g in ("ERBB2", "EPCAM") if g in table.index]
    if demo:
        lines += gene_table("**The demo's marker genes:**", demo)
    lines.append(CARD_END)
    card = out / "MODEL_CARD.md"
    text = card.read_text() if card.is_file() else f"# Model card\n\n{CARD_BEGIN}\n{CARD_END}\n"
    a, b = text.index(CARD_BEGIN), text.index(CARD_END) + len(CARD_END)
    card.write_text(text[:a] + "\n".join(lines) + text[b:])
    log(f"wrote the tables of {card}")


if __name__ == "__main__":
    main()
