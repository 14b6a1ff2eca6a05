"""A silver-standard check of predicted cells on real tissue: the composition their profiles imply, per spot,
against the authors' stereoscope proportions of the same spots (HER2ST).

Reads the output folders of ``bitro demo`` (its held-out section's cells were predicted by a model that never saw
that section; by default C3, whose patient C also gave two of the three training sections). For every cell of the
held-out section inside a measured spot, each of three marker sets scores its predicted profile (the mean over the
set's genes of the expression z-scored over the section's cells) and the cell is called epithelial, immune or
stromal by the highest score. Each spot's share of each class among its cells is compared across the spots with
the stereoscope proportions of ``../shared/data/her2st_atlas/stereoscope_major/`` (epithelial = Epithelial;
immune = B-cells + T-cells + Myeloid + Plasma Cells; stromal = CAFs + Endothelial + PVL): Pearson r over spots, per
class. Beside them:

- ``equal split``: every cell of a spot given the spot's predicted profile, so all cells of a spot get one class
  (shares 0 or 1): what the cells add over the spot prediction;
- ``spot prediction, score``: the spot's predicted profile scored directly (a continuous score, no cells);
- ``measured spot, score``: the spot's measured expression (log1p CP10k) scored the same way: how far the marker
  sets themselves agree with stereoscope, a ceiling of sorts for this check.

stereoscope itself is inferred from the measured expression, so this is a silver standard, not ground truth.
Run from the repository root, after ``bitro demo`` (one folder per model)::

    bitro demo --out demo_cell                         # the default per-cell readout
    python benchmarks/cell_composition.py cell=demo_cell
    python benchmarks/cell_composition.py cell=demo_cell gene=demo_gene --section C3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
STEREOSCOPE = ROOT.parent / "shared" / "data" / "her2st_atlas" / "stereoscope_major"
#: Marker genes of each class among the demo model's genes (the 785 Hist2ST genes plus ERBB2 and EPCAM).
MARKERS = {
    "epithelial": ["EPCAM", "KRT8", "ERBB2"],
    "immune": ["PTPRC", "CD74", "IGKC", "IGLC2", "CD68", "HLA-DRA", "JCHAIN", "CD52", "TYROBP", "C1QB"],
    "stromal": ["COL3A1", "FN1", "SPARC", "LUM", "POSTN", "VWF", "MYL9", "MGP"],
}
#: stereoscope's 8 major types summed into the three classes.
TYPES = {
    "epithelial": ["Epithelial"],
    "immune": ["B-cells", "T-cells", "Myeloid", "Plasma Cells"],
    "stromal": ["CAFs", "Endothelial", "PVL"],
}
MIN_CELLS = 3  # spots with fewer cells inside are left out (a share of 1 or 2 cells says little)


def class_scores(values: pd.DataFrame) -> pd.DataFrame:
    """Rows x classes: the mean over each class's markers of the expression z-scored over the rows."""
    z = (values - values.mean()) / values.std(ddof=0).replace(0, np.nan)
    return pd.DataFrame({c: z[[g for g in genes if g in z]].mean(axis=1) for c, genes in MARKERS.items()})


def shares(calls: pd.Series, spot: pd.Series) -> pd.DataFrame:
    """Spots x classes: the share of each spot's cells called each class."""
    table = pd.crosstab(spot, calls, normalize="index")
    return table.reindex(columns=list(MARKERS), fill_value=0.0)


def correlations(estimate: pd.DataFrame, truth: pd.DataFrame) -> dict[str, float]:
    spots = estimate.index.intersection(truth.index)
    return {c: float(np.corrcoef(estimate.loc[spots, c], truth.loc[spots, c])[0, 1]) for c in MARKERS}


def evaluate(folder: Path, section: str) -> tuple[dict[str, dict[str, float]], int, int]:
    import spatialdata as sd

    from bitro.tl._targets import dense, to_scale

    sdata = sd.read_zarr(folder / "sdata.zarr")
    cells = sdata["bitro_cells"]
    cells = cells[(cells.obs["sample"] == section).to_numpy() & cells.obs["spot_id"].notna().to_numpy()]
    spots = sdata["spots"]
    spots = spots[(spots.obs["sample"] == section).to_numpy()]
    counts = cells.obs["spot_id"].astype(str).value_counts()
    kept = counts.index[counts >= MIN_CELLS]
    cells = cells[cells.obs["spot_id"].astype(str).isin(kept).to_numpy()]
    spot_of = cells.obs["spot_id"].astype(str)

    stereo = pd.read_csv(STEREOSCOPE / f"{section}.tsv.gz", sep="\t", index_col=0)
    truth = pd.DataFrame({c: stereo[types].sum(axis=1) for c, types in TYPES.items()})

    genes = list(cells.var_names)
    predicted = pd.DataFrame(np.asarray(cells.X), index=cells.obs_names, columns=genes)
    ours = shares(class_scores(predicted).idxmax(axis=1), spot_of)
    spot_pred = spots.obsm["bitro_predicted"].set_axis(spots.obs["spot_id"].astype(str).to_numpy())[genes]
    equal_cells = spot_pred.loc[spot_of.to_numpy()].set_axis(cells.obs_names)
    equal = shares(class_scores(equal_cells).idxmax(axis=1), spot_of)
    measured = pd.DataFrame(
        to_scale(dense(spots[:, genes].X), "cp10k"), index=spots.obs["spot_id"].astype(str).to_numpy(), columns=genes
    ).loc[kept]
    rows = {
        "bitro cells": correlations(ours, truth),
        "equal split": correlations(equal, truth),
        "spot prediction, score": correlations(class_scores(spot_pred.loc[kept]), truth),
        "measured spot, score": correlations(class_scores(measured), truth),
    }
    return rows, cells.n_obs, len(kept)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("demos", nargs="+", help="LABEL=FOLDER: bitro demo output folders (the model's readout as label)")
    p.add_argument("--section", default="C3", help="the demo's held-out section (default C3)")
    args = p.parse_args()
    print(f"# {args.section}: Pearson r over spots ({MIN_CELLS}+ cells inside) of each class's share with stereoscope\n")
    print("| model | method | " + " | ".join(MARKERS) + " | mean |")
    print("|---" * (len(MARKERS) + 3) + "|")
    for item in args.demos:
        label, _, folder = item.partition("=")
        rows, n_cells, n_spots = evaluate(Path(folder), args.section)
        for method, r in rows.items():
            cells = " | ".join(f"{r[c]:.3f}" for c in MARKERS)
            print(f"| {label} | {method} | {cells} | {np.mean(list(r.values())):.3f} |")
        print(f"\n({label}: {n_cells} cells in {n_spots} spots)\n")


if __name__ == "__main__":
    main()
