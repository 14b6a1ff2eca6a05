"""Leave-one-section-out benchmark of ``bt.tl.fit`` / ``bt.tl.predict`` on the four HER2ST sections.

For each held-out section (B4, C2, C3, C4) and each target scale (``cp10k``: log1p of counts per 10k, library
size over all genes; ``log1p``: log1p of raw counts; ``hist2st``: log1p of counts per 10k, library size over the
785 predicted genes only, as Hist2ST and HisToGene normalise), on the 785 Hist2ST genes:

- ``mean``: the training-mean profile (high PCC_overall, no PCC_gene);
- ``ridge``: ridge regression (RidgeCV) on colour statistics of each spot's crop (RGB / HSV / optical
  density: mean, std, 10/50/90th percentiles);
- ``rrr colour``: the reduced-rank ridge (``bt.tl.reduced_rank_ridge``, 10 components) on the same colour
  statistics, its gene basis fitted on the HER2ST expression atlas (``../shared/data/her2st_atlas/``, expression
  only) leaving out every section of the held-out section's patient (B4: patient B; C2-C4: patient C);
- ``rrr effnet``: the same on multi-scale spot embeddings (EfficientNet-Lite0 tokens of 150, 300 and 600 um fields
  of view, ``bt.pp.spot_patches(fov="growing")``, mean over each spot's tokens: 3 x 1280 numbers), when they are
  cached (``--embed`` computes them once);
- ``bitro``: the default model;
- with ``--ablations`` (cp10k; add ``--full`` for the other scales too): one row per component switched off or
  swapped (no GAT, no Transformer, no context, the paper's shared readout, the per-gene readout of the pooled spot
  (attention shares for cells), cluster loss off, no per-sample centring of the targets, no bag-size term) and
  ``paper``: the paper's variant (shared readout, spot cells only, no centring, no bag size);
- with ``--models m2ort "m2ort effnet" cmrcnet``: registered predictors that read spot patches
  (``bt.pp.spot_patches``: 112 um / 224 px / 3 scales / 7 x 7 tokens, of pixels or of frozen EfficientNet-Lite0
  tokens, ``PATCH_TABLES``), trained beside BiTro on every scale;
- the gene space of BiTro (``--configs "free gene rows" "gene rank 10" "gene rank 20" "atlas gene space"``);
- retrieval blended with regression (``--configs "no retrieval" "retrieval alone"``: ``retrieval_weight`` 0 or 1
  instead of the default 0.5);
- multi-scale patch tokens (``--configs "patch tokens"``; issue #15 item 6): the ``rrr effnet`` row's spot embeddings
  (``--embed``) as three extra tokens (one per field of view, ``patch_key`` / ``patch_scales`` of ``bt.tl.fit``) in each
  spot's Transformer sequence beside its cells (the fields of cells below are left out then: they exclude each other);
- fields of cells (``field_radii``, on by default; ``--configs "no fields"`` turns them off): the mean cell features
  within 75, 150 and 300 um of each spot centre, one token each, beside its cells;
- the batch-agnostic latent (issue #16; ``--configs "latent aux" "latent aux 0.3" "latent aux 3" "latent decode"
  "latent aux + decode" "atlas gene space 10"``): scVI (``bt.tl.expression_encoder``, batch = patient, 10 latent dimensions, 30 epochs) trained on the
  atlas's counts of the 785 genes without the held-out section's patient (``load_latent``; cached in
  ``benchmarks/_cache/her2st_latent_no{B,C}/``, ~1 min each), its latent of the training spots as BiTro's
  auxiliary target (``aux_key``), and/or the gene space (rank 10) spanned by its decoder: the atlas without the
  patient decoded from its latent, batch-free (``gene_reference``). Measured (docs/benchmarks.md, "The latent as
  a target for BiTro"): no gain over the default, single networks or 3-member ensembles.

Every trained row is a name and the keyword arguments of ``bt.tl.fit`` (``ABLATIONS``, ``MODELS``); a model whose
input table is the patch table gets the patch table as ``cells=``, the others the cell table.

PCC_overall: mean over spots of the Pearson correlation over genes. PCC_gene: mean over genes of the
Pearson correlation over the held-out section's spots; genes with zero variance in the held-out truth
are left out. Cell features: the weight-free "handcrafted" encoder and the bundled EfficientNet-Lite0
(concatenated raw features), with the scaler + PCA (128) and the K-means phenotypes fitted on the
training sections' cells only. Early stopping holds out one training section; the held-out section is
never looked at during training. ``fit s``: seconds to fit (and, for the baselines, predict) each row.

Folds run one after the other (``--threads 2`` uses both cores of a laptop: 831 s for the default run), or in
``--jobs`` processes at once (e.g. ``--jobs 2 --threads 1``); the results do not depend on it. Segmentation and raw
cell features are cached in ``benchmarks/_cache/`` (first run: about 30 min on 2 busy cores), as are the atlas's
785 genes (first run: ~30 s) and, with ``--embed``, the spot embeddings. Run from the repository root::

    python benchmarks/her2st.py --threads 2            # default model + baselines on the three scales
    python benchmarks/her2st.py --quick                # default model + baselines, cp10k only
    python benchmarks/her2st.py --configs              # the baselines only, every fold and scale (~1 min)
    python benchmarks/her2st.py --ablations --set n_members=1   # every ablation row on cp10k (single models)
    python benchmarks/her2st.py --quick --configs bitro "no context" --held-out C2   # one fold, two rows
    python benchmarks/her2st.py --quick --configs --models m2ort cmrcnet --model-set epochs=3 --held-out C3
    python benchmarks/her2st.py --configs bitro "free gene rows" "atlas gene space" \
        --models m2ort "m2ort effnet" cmrcnet --model-set n_members=1 epochs=30 --threads 1 --jobs 2  # 2378 s
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
ATLAS = HERE.parents[1] / "shared" / "data" / "her2st_atlas"
SECTIONS = ("B4", "C2", "C3", "C4")
SCALES = ("cp10k", "log1p", "hist2st")
ENCODERS = ("handcrafted", "efficientnet")
#: Components of the reduced-rank ridge's gene basis.
N_COMPONENTS = 10
#: The multi-scale spot embeddings of the ``rrr effnet`` row: EfficientNet-Lite0 of 150, 300 and 600 um fields.
EMBED_PATCHES = {"size_um": 150.0, "patch_px": 224, "scales": 3, "fov": "growing", "grid": 7, "encoder": "efficientnet"}
#: The patch tables of the patch models (``MODELS``): M2ORT's 224 px patches of ~112 um (about 154 um at HER2ST's
#: 0.69 um/px native 224 px), 3 scales, 7 x 7 tokens, as pixels or as frozen EfficientNet-Lite0 tokens.
PATCH_TABLES = {
    "pixels": {"size_um": 112.0, "patch_px": 224, "scales": 3, "fov": "same", "grid": 7, "encoder": None},
    "effnet": {"size_um": 112.0, "patch_px": 224, "scales": 3, "fov": "same", "grid": 7, "encoder": "efficientnet"},
}
#: Rows of registered predictors (``--models``): name -> (patch table, keyword arguments of ``bt.tl.fit``).
#: CMRCNet's from-scratch ViT does not train on 2 cores (SEED_SYSTEMS.md §2.6): it reads frozen EfficientNet tokens.
MODELS = {
    "m2ort": ("pixels", {"model": "m2ort"}),
    "m2ort effnet": ("effnet", {"model": "m2ort"}),
    "cmrcnet": ("effnet", {"model": "cmrcnet"}),
}
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
    # the gene space (gene_rank; 10 by default): free gene rows, other ranks, the atlas's axes instead of the
    # training targets' ("atlas": the atlas without the held-out section's patient, as for the rrr rows)
    "free gene rows": {"gene_rank": 0},
    "gene rank 10": {"gene_rank": 10},
    "gene rank 20": {"gene_rank": 20},
    "atlas gene space": {"gene_reference": "atlas"},
    # retrieval blended with regression (issue #15; on by default for spot models): off, or alone
    "no retrieval": {"retrieval_weight": 0.0},
    "retrieval alone": {"retrieval_weight": 1.0},
    # the batch-agnostic latent (issue #16): scVI's latent as an auxiliary target (``"latent"``: the held-out
    # patient's encoder, ``load_latent``), and a gene space spanned by its decoder (``"decoded"``: the atlas without
    # the patient as the decoder gives it back, batch-free; rank 10 = the latent's width), beside the raw atlas's
    # axes at the same rank
    "latent aux": {"aux_key": "latent"},
    "latent aux 0.3": {"aux_key": "latent", "aux_weight": 0.3},
    "latent aux 3": {"aux_key": "latent", "aux_weight": 3.0},
    "latent decode": {"gene_reference": "decoded", "gene_rank": 10},
    "latent aux + decode": {"aux_key": "latent", "gene_reference": "decoded", "gene_rank": 10},
    "atlas gene space 10": {"gene_reference": "atlas", "gene_rank": 10},
    # multi-scale patch tokens beside the cell tokens (issue #15 item 6): the ``rrr effnet`` row's spot embeddings
    # (``EMBED_PATCHES``, cached by ``--embed``), one token per field of view in each spot's Transformer sequence
    "patch tokens": {"patch_key": "effnet", "patch_scales": EMBED_PATCHES["scales"]},
    # fields of cells (on by default): the mean cell features within 75, 150 and 300 um of each spot, one token each
    "no fields": {"field_radii": ()},
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
def load_all(sections, *, cells: bool = True):
    """The SpatialData of the sections (images lazy), its spot table (raw counts, colour statistics) and, with
    ``cells``, the cell table (raw features, graph) of all sections."""
    import anndata as ad
    import pandas as pd

    import bitro as bt
    from bitro._constants import Key

    sdata = bt.datasets.her2st(list(sections))
    spots = sdata[Key.SPOTS_TABLE]
    parts, colour = [], {}
    for s in sections:
        z = np.load(build_cache(s), allow_pickle=False)
        colour.update({(s, sid): v for sid, v in zip(z["colour_spot_id"], z["colour"], strict=True)})
        if not cells:
            continue
        raw = np.concatenate([z[f"raw_{e}"] for e in ENCODERS], axis=1)
        obs = pd.DataFrame({Key.SAMPLE: s, Key.SPOT_ID: pd.Series(z["spot_id"]).replace("", None).to_numpy()})
        obs.index = [f"{s}_{i}" for i in range(len(obs))]
        a = ad.AnnData(obs=obs)
        a.obsm[Key.FEATURES_RAW] = raw
        a.obsm[Key.SPATIAL] = z["xy"]
        parts.append((a, float(z["pixel_size"])))
    key = list(zip(spots.obs[Key.SAMPLE].astype(str), spots.obs[Key.SPOT_ID].astype(str), strict=True))
    spots.obsm["colour"] = np.stack([colour[k] for k in key])
    embedded = [embedding_file(s) for s in sections]
    if all(f.is_file() for f in embedded):
        emb = {}
        for s, f in zip(sections, embedded, strict=True):
            z = np.load(f, allow_pickle=False)
            emb.update({(s, sid): v for sid, v in zip(z["spot_id"], z["features"], strict=True)})
        spots.obsm["effnet"] = np.stack([emb[k] for k in key]).astype(np.float64)
    if not cells:
        return sdata, spots, None
    table = ad.concat([a for a, _ in parts])
    table.obs[Key.SAMPLE] = table.obs[Key.SAMPLE].astype("category")
    table.uns[Key.UNS] = {"pixel_size": {s: px for s, (_, px) in zip(sections, parts, strict=True)}}
    bt.pp.spatial_graph(table)
    return sdata, spots, table


def embedding_file(section: str) -> Path:
    return CACHE / f"her2st_{section}_spot_effnet.npz"


def build_embeddings(section: str) -> Path:
    """Multi-scale EfficientNet-Lite0 spot embeddings of one section: the mean of each spot's tokens per level."""
    import bitro as bt
    from bitro._constants import Key

    file = embedding_file(section)
    if file.is_file():
        return file
    t = time.perf_counter()
    sdata = bt.datasets.her2st([section])
    patches = bt.pp.spot_patches(sdata, key_added="effnet_tokens", **EMBED_PATCHES)
    grid2 = EMBED_PATCHES["grid"] ** 2
    tokens = np.asarray(patches.obsm[Key.PATCHES], dtype=np.float32)
    features = tokens.reshape(-1, grid2, tokens.shape[1]).mean(axis=1)
    spot_id = np.asarray(patches.obs[Key.SPOT_ID].astype(str).to_numpy()[::grid2], dtype=str)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(file, features=features.astype(np.float32), spot_id=spot_id)
    print(f"embedded {section}: {len(spot_id)} spots in {time.perf_counter() - t:.0f} s", flush=True)
    return file


def load_atlas(genes: list[str]):
    """The atlas's counts of ``genes`` and one more column, ``"(other genes)"``, the rest of each spot's library.

    Exactly what the reference needs on every scale: cp10k's library is the row sum (all genes), hist2st's the sum
    over ``genes``. Cached in ``benchmarks/_cache/`` (reading the 34 sections takes ~30 s).
    """
    import anndata as ad
    import scipy.sparse as sp

    import bitro as bt

    file = CACHE / f"her2st_atlas_{len(genes)}genes.h5ad"
    if file.is_file():
        atlas = ad.read_h5ad(file)
        if set(atlas.var_names[:-1]) <= set(genes):
            return atlas
    full = bt.datasets.her2st_atlas(path=ATLAS)
    present = [g for g in genes if g in set(full.var_names)]  # absent genes are decoded from the training spots
    x = full.X.tocsc()
    part = x[:, full.var_names.get_indexer(present)]
    rest = np.asarray(x.sum(axis=1)).ravel() - np.asarray(part.sum(axis=1)).ravel()
    atlas = ad.AnnData(
        sp.hstack([part, sp.csc_matrix(rest[:, None])]).tocsr().astype(np.float32),
        obs=full.obs[["sample", "patient"]].copy(),
    )
    atlas.var_names = [*present, "(other genes)"]
    if len(present) < len(genes):
        print(f"atlas: {len(genes) - len(present)} of the {len(genes)} genes absent", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    atlas.write_h5ad(file)
    return atlas


#: The expression encoder of the latent rows (``"latent aux"``, ``"latent decode"``): scVI, batch = patient, on the
#: atlas's counts of the predicted genes, without every section of the held-out section's patient.
LATENT_ENCODER = {"n_latent": 10, "max_epochs": 30, "n_top_genes": None, "seed": 0}


def latent_file(held_patient: str) -> Path:
    return CACHE / f"her2st_latent_no{held_patient}"


def load_latent(held_patient: str, spots, genes: list[str]):
    """The batch-agnostic latent of ``spots`` and the atlas decoded through it, from an encoder without a patient.

    scVI (``bt.tl.expression_encoder``, ``LATENT_ENCODER``: 10 latent dimensions, only 30 epochs) trained on the
    atlas's counts of ``genes`` leaving out every section of ``held_patient``, cached in
    ``benchmarks/_cache/her2st_latent_no{patient}/`` with the decoded atlas. Returns the spots' latent (posterior
    means, ``(n_spots, 10)``) and ``decoded``: the atlas without the patient as scVI's decoder gives it back, the
    expected counts of ``genes`` from each spot's latent, decoded with the mean over the training patients' batches
    (batch-free) at the spot's observed library over ``genes``, plus the atlas's ``"(other genes)"`` column, so its
    scales equal the atlas's (a ``gene_reference``).
    """
    import anndata as ad

    import bitro as bt

    folder = latent_file(held_patient)
    atlas = load_atlas(genes)
    atlas = atlas[(atlas.obs["patient"].astype(str) != held_patient).to_numpy()].copy()
    if (folder / "decoded.h5ad").is_file():
        enc = bt.tl.load_expression_encoder(folder / "encoder")
        decoded = ad.read_h5ad(folder / "decoded.h5ad")
    else:
        t = time.perf_counter()
        present = [g for g in genes if g in set(atlas.var_names)]
        train = atlas[:, present].copy()
        enc = bt.tl.expression_encoder(train, batch_key="patient", **LATENT_ENCODER)
        enc.save(folder / "encoder")
        with_counts = np.asarray(train.X.sum(axis=1)).ravel() > 0
        rate = enc.normalized_expression(train[with_counts], n_samples=1).to_numpy()  # as measured
        lib = np.asarray(train.X[with_counts].sum(axis=1)).ravel()
        other = np.asarray(atlas[with_counts, "(other genes)"].X.todense()).ravel()
        x = np.zeros((int(with_counts.sum()), atlas.n_vars), np.float32)
        x[:, atlas.var_names.get_indexer(enc.genes)] = rate * lib[:, None]
        x[:, -1] = other
        decoded = ad.AnnData(x, obs=atlas.obs[with_counts].copy())
        decoded.var_names = atlas.var_names
        decoded.write_h5ad(folder / "decoded.h5ad")
        print(f"latent encoder without patient {held_patient}: {time.perf_counter() - t:.0f} s", flush=True)
    return enc.embed(spots, key_added=None), decoded


def patient(section: str) -> str:
    """The patient of a HER2ST section: its letter (B4 -> B, C3 -> C)."""
    return section.rstrip("0123456789")


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


def trained_rows(args: argparse.Namespace) -> dict[str, dict]:
    """Every trained row of this run: name -> keyword arguments of ``bt.tl.fit``."""
    extra = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.set)}
    model_extra = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.model_set)}
    rows = {name: {**ABLATIONS[name], **extra} for name in args.configs}
    rows.update({name: {**MODELS[name][1], **model_extra} for name in args.models})
    return rows


def reads_patches(kwargs: dict) -> bool:
    """Whether the row's model reads the patch table (``bt.pp.spot_patches``) instead of the cell table."""
    from bitro.tl.models import get_model

    return get_model(kwargs.get("model", "bitro")).reads_patches


def baselines(spots, genes, test, scale, reference) -> tuple[dict, dict]:
    """Predictions of the held-out spots by the baselines on ``scale``, and their seconds."""
    import bitro as bt
    from bitro.tl._baselines import ridge_predict
    from bitro.tl._targets import dense, to_scale

    t = time.perf_counter()
    truth_all = to_scale(dense(spots.X), scale, spots.var_names.get_indexer(genes))  # hist2st: library over genes
    res = {"mean": np.broadcast_to(truth_all[~test].mean(0), (int(test.sum()), len(genes)))}
    secs = {"mean": time.perf_counter() - t}
    t = time.perf_counter()
    res["ridge"] = ridge_predict(spots.obsm["colour"][~test], truth_all[~test], spots.obsm["colour"][test])
    secs["ridge"] = time.perf_counter() - t
    train, held = spots[~test], spots[test].copy()
    for name, rep in (("rrr colour", "colour"), ("rrr effnet", "effnet")):
        if rep not in spots.obsm:
            continue
        t = time.perf_counter()
        res[name] = bt.tl.reduced_rank_ridge(
            train, held, genes=genes, scale=scale, use_rep=rep, reference=reference, n_components=N_COMPONENTS
        ).to_numpy()
        secs[name] = time.perf_counter() - t
    return res, secs


def run_fold(held: str, args: argparse.Namespace) -> list[tuple]:
    """Baselines and the configured models for one held-out section, every scale: rows of results.

    Each row: ``(scale, model, held-out, PCC_overall, PCC_gene, fit seconds, best epoch)``. Runs in a worker
    process with ``--jobs``, so it loads the (cached) data itself.
    """
    import torch

    import bitro as bt
    from bitro._constants import Key
    from bitro.tl._targets import dense, to_scale

    torch.set_num_threads(args.threads)
    bt.settings.progress = False
    rows_to_fit = trained_rows(args)
    need_cells = any(not reads_patches(kw) for kw in rows_to_fit.values())
    sdata, spots, cells = load_all(args.sections, cells=need_cells)
    genes = bt.datasets.her2st_genes()
    counts = dense(spots.X)
    test = spots.obs[Key.SAMPLE].astype(str).to_numpy() == held
    atlas = load_atlas(genes)
    reference = atlas[(atlas.obs["patient"].astype(str) != patient(held)).to_numpy()].copy()
    fold_cells = fold_features(cells, cells.obs[Key.SAMPLE].astype(str).to_numpy() != held) if need_cells else None
    if any(kw.get("patch_key") == "effnet" for kw in rows_to_fit.values()) and "effnet" not in spots.obsm:
        msg = "the 'patch tokens' row reads the cached spot embeddings: run `python benchmarks/her2st.py --embed` first"
        raise SystemExit(msg)
    decoded = None
    if any(kw.get("aux_key") == "latent" or kw.get("gene_reference") == "decoded" for kw in rows_to_fit.values()):
        latent, decoded = load_latent(patient(held), spots, genes)
        spots.obsm[Key.EXPRESSION_LATENT] = latent  # read by fit on the training spots only
    patches = {
        kind: bt.pp.spot_patches(sdata, key_added=f"patches_{kind}", **PATCH_TABLES[kind])
        for kind in dict.fromkeys(MODELS[name][0] for name in args.models)
    }
    rows = []
    for scale in args.scales:
        truth = to_scale(counts, scale, spots.var_names.get_indexer(genes))[test]
        res, fit_s = baselines(spots, genes, test, scale, reference)
        best = {}
        for name, kwargs in rows_to_fit.items():
            if scale != "cp10k" and name in ABLATIONS and name != "bitro" and not args.full:
                continue
            table = patches[MODELS[name][0]] if reads_patches(kwargs) else fold_cells
            if kwargs.get("gene_reference") in ("atlas", "decoded"):
                kwargs = {**kwargs, "gene_reference": reference if kwargs["gene_reference"] == "atlas" else decoded}
            if kwargs.get("aux_key") == "latent":
                kwargs = {**kwargs, "aux_key": Key.EXPRESSION_LATENT}
            t = time.perf_counter()
            model = bt.tl.fit(spots[~test].copy(), cells=table, genes=genes, scale=scale, **kwargs)
            fit_s[name] = time.perf_counter() - t
            best[name] = model.history[0]["best_epoch"]
            held_spots = spots[test].copy()
            bt.tl.predict(model, held_spots, cells=table, coverage="spots")  # only the spots are scored
            res[name] = held_spots.obsm[Key.PREDICTED][genes].to_numpy()
        for name, pred in res.items():
            ok = np.isfinite(pred).all(1)
            po, pg = metrics(pred[ok], truth[ok])
            rows.append((scale, name, held, po, pg, fit_s.get(name, 0.0), best.get(name, "-")))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="cp10k only")
    p.add_argument("--ablations", action="store_true", help="every ablation row (cp10k unless --full)")
    p.add_argument("--full", action="store_true", help="ablations on every scale")
    p.add_argument(
        "--configs",
        nargs="*",
        default=None,
        help=f"BiTro rows, a subset of {list(ABLATIONS)}; `--configs` alone: none (the baselines only)",
    )
    p.add_argument("--models", nargs="*", default=[], choices=list(MODELS), help="registered predictors beside BiTro")
    p.add_argument("--sections", nargs="*", default=list(SECTIONS))
    p.add_argument("--held-out", nargs="*", default=None, help="folds to run (default: every section)")
    p.add_argument("--jobs", type=int, default=1, help="folds run at once, each in its own process")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument(
        "--set", nargs="*", default=[], help="fit parameters for every BiTro row, e.g. epochs=30 validation=None"
    )
    p.add_argument("--model-set", nargs="*", default=[], help="fit parameters for every --models row, e.g. epochs=3")
    p.add_argument("--embed", action="store_true", help="compute (once) the spot embeddings of the rrr effnet row")
    args = p.parse_args()
    import bitro as bt

    args.scales = ["cp10k"] if args.quick or (args.ablations and not args.full) else list(SCALES)
    if args.configs is None:
        args.configs = list(ABLATIONS) if args.ablations else ["bitro"]
    unknown = [c for c in args.configs if c not in ABLATIONS]
    if unknown:
        p.error(f"unknown --configs {unknown}; choose from {list(ABLATIONS)}")

    t_all = time.perf_counter()
    if args.configs:
        for s in args.sections:
            build_cache(s)
    if args.embed:
        for s in args.sections:
            build_embeddings(s)
    load_atlas(bt.datasets.her2st_genes())  # cached once, before the workers read it
    t0 = time.perf_counter()
    folds = args.held_out or args.sections
    print(f"{'scale':7} {'model':18} {'held-out':8} {'PCC_overall':>11} {'PCC_gene':>9} {'fit s':>7} {'epoch':>5}")
    rows = []

    def report(fold_rows):
        for scale, name, held, po, pg, sec, best in fold_rows:
            print(f"{scale:7} {name:18} {held:8} {po:11.3f} {pg:9.4f} {sec:7.1f} {best:>5}", flush=True)
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
    print(f"{'scale':7} {'model':18} {'PCC_overall':>11} {'PCC_gene':>9} {'fit s':>7}")
    names = list(dict.fromkeys(r[1] for r in rows))
    for scale in args.scales:
        for name in names:
            sel = [r for r in rows if r[0] == scale and r[1] == name]
            if sel:
                po, pg, sec = (np.mean([r[i] for r in sel]) for i in (3, 4, 5))
                print(f"{scale:7} {name:18} {po:11.3f} {pg:9.4f} {sec:7.1f}")
    print(
        f"\nwall time {time.perf_counter() - t0:.0f} s (features cached; {time.perf_counter() - t_all:.0f} s in all), "
        f"peak RSS {peak_gb:.2f} GB per process, {args.jobs} process(es) x {args.threads} torch thread(s)"
    )


if __name__ == "__main__":
    main()
