"""TPIR on HER2ST (issue #16): a batch-agnostic expression encoder, label transfer, an ST-guided image encoder.

Three stages, each printing its tables:

- ``encoder``: scVI and scANVI (``bt.tl.expression_encoder``, batch = patient, 2,000 HVGs, 10 latent dimensions)
  trained on the 34 atlas sections (``../shared/data/her2st_atlas/``, expression only), scANVI with the
  pathologist's region labels of the 8 labelled sections (A1, B1, C1, D1, E1, F1, G2, H1; "undetermined"
  dropped; the other sections unlabelled). ``bt.tl.integration_scores`` on the labelled spots: batch mixing
  (scib's batch ASW: ``1 - |silhouette by patient|`` within each region) and label separation
  (``(silhouette by region + 1) / 2``), for the latents and for log1p CP10k PCA of the same width. Both models
  are saved to ``benchmarks/_cache/tpir/``.
- ``transfer``: leave-one-patient-out accuracy of scANVI's label transfer over the 8 labelled sections: for each
  patient, scVI + scANVI are trained on the atlas without any section of that patient (the patient is unseen),
  and the labels are transferred to its labelled section. Balanced accuracy and macro-F1 per held-out patient
  and pooled; beside them a logistic regression (``class_weight="balanced"``) on log1p CP10k PCA (10) of the
  other 7 labelled sections (no batch correction), and the majority class.
- ``regions``: the full scANVI model transfers regions (with a confidence) to every spot of the imaged sections
  B4, C2, C3, C4; these are a *silver standard* (derived from expression). Spot image features: frozen
  EfficientNet-Lite0 tokens of 150, 300 and 600 um fields of view, mean over each spot's tokens
  (``bt.pp.spot_patches(fov="growing", encoder="efficientnet")``, 3 x 1280; cached by ``benchmarks/her2st.py
  --embed``). ``bt.tl.evaluate_regions`` leave-one-section-out (logistic regression, classes balanced) on: the raw
  image features; the image features aligned by ``bt.tl.align_images`` (trained on the training sections only)
  to the scANVI latent (``clip``: symmetric InfoNCE; ``bleep``: soft targets) or to log1p CP10k PCA (10) instead
  (CLIP / BLEEP without batch correction). Median over ``--seeds`` seeds of the alignment; per-class table of
  the raw features and of the best aligned row.

Run from the repository root (2 busy CPU cores; the image features need ``python benchmarks/her2st.py --embed``
first, or are computed here once)::

    python benchmarks/tpir.py --threads 1                                       # all stages, the defaults
    python benchmarks/tpir.py --stages encoder regions --retrain --threads 1    # the full models (~15 min) + regions
    python benchmarks/tpir.py --stages transfer --threads 1                     # 8 folds, ~2.5 min each

The full models are saved to ``benchmarks/_cache/tpir/{scvi,scanvi}`` and reused by later runs unless
``--retrain``. The one spot of the atlas without counts (D5_18x20) is left out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
CACHE = HERE / "_cache"
ATLAS = HERE.parents[1] / "shared" / "data" / "her2st_atlas"
LABELLED = ("A1", "B1", "C1", "D1", "E1", "F1", "G2", "H1")
IMAGED = ("B4", "C2", "C3", "C4")
REGION = "region"
N_LATENT = 10


def load_atlas():
    """The 34 atlas sections with the pathologist's regions in ``.obs["region"]`` (NaN where none)."""
    import anndata as ad

    import bitro as bt

    file = CACHE / "tpir_atlas_v2.h5ad"
    if file.is_file():
        return ad.read_h5ad(file)
    atlas = bt.datasets.her2st_atlas(path=ATLAS, regions=True)  # the pathologist's regions, NaN where none
    for s in LABELLED:
        print(f"  {s}: {int(atlas.obs[REGION][atlas.obs['sample'] == s].notna().sum())} labelled spots", flush=True)
    empty = np.asarray(atlas.X.sum(axis=1)).ravel() == 0
    print(f"  spots without counts left out: {list(atlas.obs_names[empty])}")
    atlas = atlas[~empty].copy()
    CACHE.mkdir(parents=True, exist_ok=True)
    atlas.write_h5ad(file)
    return atlas


def table(df: pd.DataFrame) -> str:
    return df.to_string(float_format=lambda v: f"{v:.3f}")


def encoder_stage(atlas, args) -> None:
    import bitro as bt

    out = CACHE / "tpir"
    print(f"\n== encoder: {atlas.n_obs} spots, {atlas.obs['sample'].nunique()} sections, 8 patients ==", flush=True)
    times = {}
    if (out / "scvi").is_dir() and (out / "scanvi").is_dir() and not args.retrain:
        print(f"models read from {out} (trained by an earlier run; --retrain trains them again)")
        scvi_enc, scanvi_enc = (
            bt.tl.load_expression_encoder(out / "scvi"),
            bt.tl.load_expression_encoder(out / "scanvi"),
        )
    else:
        t = time.perf_counter()
        scvi_enc = bt.tl.expression_encoder(atlas, n_latent=N_LATENT, max_epochs=args.epochs, seed=0)
        times["scvi"] = time.perf_counter() - t
        scvi_enc.save(out / "scvi")
        t = time.perf_counter()
        scanvi_enc = bt.tl.expression_encoder(
            atlas,
            labels_key=REGION,
            n_latent=N_LATENT,
            max_epochs=args.epochs,
            scanvi_epochs=args.scanvi_epochs,
            seed=0,
        )
        times["scanvi (scVI + scANVI)"] = time.perf_counter() - t
        scanvi_enc.save(out / "scanvi")
    print(scvi_enc, scanvi_enc, sep="\n")
    labelled = atlas[atlas.obs[REGION].notna()].copy()
    scvi_enc.embed(labelled, key_added="X_scvi")
    scanvi_enc.embed(labelled, key_added="X_scanvi")
    bt.tl.log1p_pca(labelled, n_comps=N_LATENT, key_added="X_pca")
    whole = atlas.copy()
    scvi_enc.embed(whole, key_added="X_scvi")
    scanvi_enc.embed(whole, key_added="X_scanvi")
    bt.tl.log1p_pca(whole, n_comps=N_LATENT, key_added="X_pca")
    rows = {}
    for name, rep in (("log1p CP10k PCA", "X_pca"), ("scVI latent", "X_scvi"), ("scANVI latent", "X_scanvi")):
        s = bt.tl.integration_scores(labelled, use_rep=rep, batch_key="patient", labels_key=REGION, n_spots=None)
        w = bt.tl.integration_scores(whole, use_rep=rep, batch_key="patient", n_spots=5000)
        rows[name] = {
            "batch mixing (labelled, within region)": s["batch_mixing"],
            "label separation (labelled)": s["label_separation"],
            "batch mixing (all spots, 5000 sampled)": w["batch_mixing"],
        }
    print(f"{len(labelled)} labelled spots of 8 sections (8 patients); {N_LATENT} dimensions each")
    print(table(pd.DataFrame(rows).T))
    if times:
        print(f"training time, one run, {args.epochs} scVI epochs (+{args.scanvi_epochs} scANVI):")
    for k, v in times.items():
        print(f"  {k}: {v:.0f} s")


def transfer_stage(atlas, args) -> None:
    from sklearn.linear_model import LogisticRegression

    import bitro as bt
    from bitro.tl._regions import region_scores

    print(
        f"\n== transfer: leave one patient out, scVI {args.lopo_epochs} + scANVI {args.lopo_scanvi_epochs} epochs ==",
        flush=True,
    )
    rows, pooled = [], []
    for s in LABELLED:
        patient = s[0]
        t = time.perf_counter()
        train = atlas[atlas.obs["patient"] != patient].copy()
        test = atlas[(atlas.obs["sample"] == s) & atlas.obs[REGION].notna()].copy()
        enc = bt.tl.expression_encoder(
            train,
            labels_key=REGION,
            n_latent=N_LATENT,
            max_epochs=args.lopo_epochs,
            scanvi_epochs=args.lopo_scanvi_epochs,
            seed=0,
        )
        pred = enc.transfer_labels(test, key_added=None)["label"].astype(str).to_numpy()
        truth = test.obs[REGION].astype(str).to_numpy()
        # baseline: logistic regression on log1p CP10k PCA of the other labelled sections (no batch correction)
        lab = atlas[atlas.obs[REGION].notna()].copy()
        bt.tl.log1p_pca(lab, n_comps=N_LATENT)
        tr = (lab.obs["patient"] != patient).to_numpy()
        te = (lab.obs["sample"] == s).to_numpy()
        lr = LogisticRegression(class_weight="balanced", max_iter=2000).fit(
            lab.obsm["X_pca"][tr], lab.obs[REGION].astype(str)[tr]
        )
        base = lr.predict(lab.obsm["X_pca"][te])
        values, counts = np.unique(lab.obs[REGION].astype(str)[tr], return_counts=True)
        majority = np.full(len(truth), values[np.argmax(counts)])
        sc, sb, sm = region_scores(truth, pred), region_scores(truth, base), region_scores(truth, majority)
        rows.append(
            {
                "held out": f"{patient} ({s})",
                "spots": len(truth),
                "scANVI bal. acc.": sc["balanced_accuracy"],
                "scANVI macro-F1": sc["macro_f1"],
                "PCA+LR bal. acc.": sb["balanced_accuracy"],
                "PCA+LR macro-F1": sb["macro_f1"],
                "majority macro-F1": sm["macro_f1"],
                "s": time.perf_counter() - t,
            }
        )
        pooled.append(pd.DataFrame({"truth": truth, "scanvi": pred, "pca": base}))
        print(rows[-1], flush=True)
    df = pd.DataFrame(rows).set_index("held out")
    p = pd.concat(pooled)
    a, b = region_scores(p["truth"], p["scanvi"]), region_scores(p["truth"], p["pca"])
    df.loc["pooled"] = [
        len(p),
        a["balanced_accuracy"],
        a["macro_f1"],
        b["balanced_accuracy"],
        b["macro_f1"],
        np.nan,
        np.nan,
    ]
    df.loc["mean over patients"] = df.iloc[:-1].mean()
    print(table(df))


def imaged_spots(args):
    """The imaged sections' spots: atlas counts, pooled image features, scANVI latent and transferred regions."""
    import sys

    import bitro as bt

    sys.path.insert(0, str(HERE))
    from her2st import build_embeddings

    atlas = load_atlas()
    spots = atlas[atlas.obs["sample"].isin(IMAGED)].copy()
    feats = {}
    for s in IMAGED:
        z = np.load(build_embeddings(s), allow_pickle=False)
        feats.update({(s, i): v for i, v in zip(z["spot_id"], z["features"], strict=True)})
    keys = list(zip(spots.obs["sample"].astype(str), spots.obs["spot_id"].astype(str), strict=True))
    have = np.array([k in feats for k in keys])
    spots = spots[have].copy()
    spots.obsm[bt.Key.IMAGE_FEATURES] = np.stack([feats[k] for k, h in zip(keys, have, strict=True) if h])
    enc_dir = CACHE / "tpir" / "scanvi"
    if not enc_dir.is_dir():
        encoder_stage(atlas, args)
    enc = bt.tl.load_expression_encoder(enc_dir)
    enc.embed(spots)
    enc.transfer_labels(spots)
    bt.tl.log1p_pca(spots, n_comps=N_LATENT, key_added="X_pca")
    return spots


def regions_stage(args) -> None:
    import bitro as bt

    spots = imaged_spots(args)
    print(f"\n== regions: {spots.n_obs} spots of {', '.join(IMAGED)}; transferred regions (silver standard) ==")
    counts = pd.crosstab(spots.obs["sample"], spots.obs[bt.Key.TRANSFERRED].astype(str))
    counts["mean confidence"] = spots.obs.groupby("sample", observed=True)[f"{bt.Key.TRANSFERRED}_confidence"].mean()
    print(table(counts))
    rows, per_class = {}, {}
    res = bt.tl.evaluate_regions(spots, use_rep=bt.Key.IMAGE_FEATURES)
    rows["raw EfficientNet features"] = res["folds"]
    per_class["raw EfficientNet features"] = res["per_class"]
    for target, rep in (("scANVI latent", bt.Key.EXPRESSION_LATENT), ("log1p PCA", "X_pca")):
        for loss in ("clip", "bleep"):
            runs = []
            for seed in range(args.seeds):
                align = {"expression_rep": rep, "loss": loss, "epochs": args.align_epochs, "seed": seed}
                runs.append(bt.tl.evaluate_regions(spots, use_rep=bt.Key.IMAGE_FEATURES, align=align, seed=seed))
            name = f"{loss} -> {target}"
            folds = pd.concat([r["folds"] for r in runs]).groupby(level=0, sort=False).median()
            rows[name] = folds
            per_class[name] = pd.concat([r["per_class"] for r in runs]).groupby(level=0).median()
            print(name, f"macro-F1 (all) {folds.loc['all', 'macro_f1']:.3f}", flush=True)
    summary = pd.DataFrame(
        {
            name: {
                **{f"{g} macro-F1": f.loc[g, "macro_f1"] for g in IMAGED},
                "all bal. acc.": f.loc["all", "balanced_accuracy"],
                "all macro-F1": f.loc["all", "macro_f1"],
                "all acc.": f.loc["all", "accuracy"],
            }
            for name, f in rows.items()
        }
    ).T
    majority = rows["raw EfficientNet features"]["majority_macro_f1"]
    summary.loc["majority class"] = {f"{g} macro-F1": majority[g] for g in IMAGED}
    print(f"leave one section out; aligned rows: median over {args.seeds} seeds, {args.align_epochs} epochs")
    print(table(summary))
    best = summary.drop(["raw EfficientNet features", "majority class"])["all macro-F1"].idxmax()
    for name in ("raw EfficientNet features", best):
        print(f"\nper class, {name} (pooled over the held-out sections)")
        print(table(per_class[name]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", default=["encoder", "transfer", "regions"])
    p.add_argument("--epochs", type=int, default=100, help="scVI epochs of the full models")
    p.add_argument("--scanvi-epochs", type=int, default=20)
    p.add_argument("--lopo-epochs", type=int, default=40, help="scVI epochs of each leave-one-patient-out model")
    p.add_argument("--lopo-scanvi-epochs", type=int, default=10)
    p.add_argument("--align-epochs", type=int, default=50)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--retrain", action="store_true", help="train the full models even when saved ones exist")
    args = p.parse_args()
    import torch

    import bitro as bt

    torch.set_num_threads(args.threads)
    bt.settings.progress = False
    atlas = load_atlas() if {"encoder", "transfer"} & set(args.stages) else None
    if "encoder" in args.stages:
        encoder_stage(atlas, args)
    if "transfer" in args.stages:
        transfer_stage(atlas, args)
    if "regions" in args.stages:
        regions_stage(args)


if __name__ == "__main__":
    main()
