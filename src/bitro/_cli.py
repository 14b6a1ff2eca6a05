"""The ``bitro`` command line: predict a slide, the demo, and the pipeline steps for batch use on many slides.

Predict every cell of your own H&E slide with the ready HER2+ breast cancer model (or a model of yours)::

    bitro predict my_slide.svs --model her2st --out my_slide_bitro
    bitro predict my_slide.jpg --pixel-size 0.5 --out my_slide_bitro --genes ERBB2 CD74

The steps read and write SpatialData zarr stores, so they can run as separate jobs
(one per slide on a cluster, for example)::

    bitro read  ST_FOLDER --samples A1 A2 --out sections.zarr
    bitro cells sections.zarr --out cells.zarr
    bitro fit   cells.zarr --model model/ --target spot
    bitro cells new_slide.zarr --reference model/ --out new_cells.zarr
    bitro predict new_cells.zarr --model model/ --out predicted.zarr
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bitro._checks import TrainingDivergedError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitro", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="Run the whole pipeline on the bundled HER2ST sections.")
    d.add_argument("--out", default="bitro_demo", help="Output folder (default: bitro_demo).")
    d.add_argument("--test-sample", default="C3", help="Section held out for testing (default: C3).")
    d.add_argument("--epochs", type=int, default=20, help="Maximum training epochs (default: 20).")
    d.add_argument("--n-jobs", type=int, default=None, help="Local processes for image work.")
    d.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")

    r = sub.add_parser("read", help="Read legacy ST sections (HER2ST format) into a SpatialData zarr store.")
    r.add_argument("folder", help="Folder with {S}.tsv.gz, {S}_selection.tsv and {S}.jpg per section.")
    r.add_argument("--samples", nargs="*", default=None, help="Section ids (default: every section found).")
    r.add_argument("--out", required=True, help="Output zarr store.")
    r.add_argument("--overwrite", action="store_true")

    c = sub.add_parser("cells", help="Stain normalisation, segmentation, cell features, phenotypes and graph.")
    c.add_argument("store", help="Input SpatialData zarr store.")
    c.add_argument("--out", required=True, help="Output zarr store (may equal the input with --overwrite).")
    c.add_argument(
        "--reference",
        default=None,
        metavar="MODEL",
        help="Prepare a new slide for this model (a folder or a bundled name such as her2st): its stain reference, "
        "encoder, scaler + PCA and phenotypes, instead of fitting new ones.",
    )
    c.add_argument("--stain", choices=["macenko", "vahadane", "none"], default=None, help="Default: macenko.")
    c.add_argument("--encoder", default=None, help="Cell encoder (default: handcrafted).")
    c.add_argument("--n-clusters", type=int, default=None, help="Phenotypes (default: 8).")
    c.add_argument("--n-jobs", type=int, default=None)
    c.add_argument("--overwrite", action="store_true")

    f = sub.add_parser("fit", help="Fit a BiTro model on the spots (or bulk table) of a store.")
    f.add_argument("store", help="SpatialData zarr store with a cell table.")
    f.add_argument("--model", required=True, help="Folder to save the model to.")
    f.add_argument("--target", choices=["spot", "bulk"], default="spot")
    f.add_argument(
        "--predictor",
        default="bitro",
        help="Registered model to train: bitro (cells), m2ort or cmrcnet (spot patches, cut if the store has none).",
    )
    f.add_argument("--samples", nargs="*", default=None, help="Train on these sections only.")
    f.add_argument("--genes", default=None, help="Text file with one gene symbol per line.")
    f.add_argument("--epochs", type=int, default=100)
    f.add_argument("--lr", type=float, default=None, help="Learning rate (default: 2e-3).")
    f.add_argument("--overwrite", action="store_true")

    q = sub.add_parser(
        "predict",
        help="Predict every cell of a slide: an image file (JPEG/PNG, TIFF/OME-TIFF/SVS) or a store with a cell table.",
    )
    q.add_argument(
        "input",
        help="An H&E image file (the whole pipeline runs: segmentation, cells, prediction) or a SpatialData zarr "
        "store with a cell table made for the model (`bitro cells --reference`).",
    )
    q.add_argument(
        "--model", default="her2st", help="A saved model folder or a bundled model's name (default: her2st)."
    )
    q.add_argument(
        "--out",
        required=True,
        help="For an image: output folder (sdata.zarr, cells.h5ad, expression_GENE.png). For a store: output store.",
    )
    q.add_argument(
        "--pixel-size",
        type=float,
        default=None,
        metavar="UM",
        help="Micrometres per pixel; required for JPEG/PNG, overrides a TIFF/SVS file's own value.",
    )
    q.add_argument("--genes", nargs="+", default=None, help="Genes to draw (default: ERBB2, EPCAM or the best-scored).")
    q.add_argument("--n-jobs", type=int, default=None, help="Local processes for image work.")
    q.add_argument(
        "--overwrite", action="store_true", help="Replace an existing output (only once the new one is complete)."
    )
    return p


def _read(store: str):
    import spatialdata as sd

    path = Path(store)
    if not path.exists():
        msg = f"No SpatialData store at {store!r}."
        raise FileNotFoundError(msg)
    return sd.read_zarr(path)


def _table_for(sdata, target: str):
    """The spot or bulk table of a store."""
    from bitro._constants import Key
    from bitro._utils import check_key

    key = Key.SPOTS_TABLE if target == "spot" else Key.BULK_TABLE
    check_key(sdata.tables, key, "Table")
    return sdata.tables[key]


def run(args: argparse.Namespace) -> None:
    """Run one parsed command."""
    import bitro as bt
    from bitro import _pipeline
    from bitro._constants import Key

    if args.command == "demo":
        metrics = _pipeline.demo(
            args.out, test_sample=args.test_sample, overwrite=args.overwrite, epochs=args.epochs, n_jobs=args.n_jobs
        )
        sys.stdout.write(metrics.to_string() + "\n")
    elif args.command == "read":
        sdata = bt.datasets.her2st(args.samples, path=args.folder)
        bt.io.write_zarr(sdata, args.out, overwrite=args.overwrite)
        sys.stdout.write(f"{sdata}\n")
    elif args.command == "cells":
        if Path(args.out).exists() and not args.overwrite:
            msg = f"{args.out!r} exists; pass --overwrite to replace it."
            raise FileExistsError(msg)
        if args.reference is not None:
            given = [
                f"--{k.replace('_', '-')}" for k in ("stain", "encoder", "n_clusters") if getattr(args, k) is not None
            ]
            if given:
                msg = (
                    f"{' and '.join(given)} cannot be combined with --reference: the model fixes them; leave them out."
                )
                raise ValueError(msg)
            model = bt.tl.load_model(args.reference)
            sdata = _read(args.store)
            _pipeline.prepare_cells(sdata, model, n_jobs=args.n_jobs)
        else:
            sdata = _read(args.store)
            stain = args.stain or "macenko"
            _pipeline.cell_table(
                sdata,
                stain=None if stain == "none" else stain,
                encoder=args.encoder or "handcrafted",
                n_clusters=8 if args.n_clusters is None else args.n_clusters,
                n_jobs=args.n_jobs,
            )
        # the stain-normalised images are lazy views of the originals that can be recomputed: not written
        keep = [name for _, name, _ in sdata.gen_elements() if not name.endswith(Key.NORMALIZED_SUFFIX)]
        bt.io.write_zarr(sdata.subset(keep, filter_tables=False), args.out, overwrite=args.overwrite)
    elif args.command == "fit":
        if Path(args.model).exists() and not args.overwrite:
            msg = f"{args.model!r} exists; pass --overwrite to replace it."
            raise FileExistsError(msg)
        sdata = _read(args.store)
        adata = _table_for(sdata, args.target)
        if args.samples:
            adata = adata[adata.obs[Key.SAMPLE].isin(args.samples)].copy()
        genes = Path(args.genes).read_text().split() if args.genes else None
        lr = {} if args.lr is None else {"lr": args.lr}
        from bitro.tl.models import get_model

        spec = get_model(args.predictor)
        input_table = spec.architecture.input_table
        if spec.reads_patches and input_table not in sdata.tables:
            bt.pp.spot_patches(sdata)  # M2ORT's 224-px patches, 3 scales of one field of view
        model = bt.tl.fit(
            adata,
            target=args.target,
            model=args.predictor,
            cells=sdata[input_table],
            genes=genes,
            epochs=args.epochs,
            **lr,
        )
        stain = _pipeline.stain_reference_record(sdata)
        if stain is not None:  # `bitro cells --reference` / `bitro predict` normalise new slides to it
            model.config.stain_reference = stain
        model.save(args.model)
    elif args.command == "predict":
        _predict(args)


def _predict(args: argparse.Namespace) -> None:
    """``bitro predict``: an image file through the whole pipeline, or a store with a cell table (or spots)."""
    import bitro as bt
    from bitro import _pipeline
    from bitro._constants import Key
    from bitro.tl._predict import reads_patches

    source = Path(args.input)
    patches = False
    if source.is_dir():  # a SpatialData zarr store with a cell table (or, for a patch model, spots)
        if args.pixel_size is not None:
            msg = "--pixel-size is for image files; a SpatialData store records its pixel size already."
            raise ValueError(msg)
        if args.genes is not None:
            msg = "--genes chooses the figures of an image file's output folder; a store gets no figures (use `bt.pl`)."
            raise ValueError(msg)
        if Path(args.out).exists() and not args.overwrite:
            msg = f"{args.out!r} exists; pass --overwrite to replace it."
            raise FileExistsError(msg)
        model = bt.tl.load_model(args.model)
        patches = reads_patches(model)
        sdata = _read(args.input)
        if patches and Key.PATCHES_TABLE not in sdata.tables:
            bt.pp.spot_patches(sdata, **_patch_settings(model))  # cut as the model's training patches were
        expr = bt.tl.predict(model, sdata)
        bt.io.write_zarr(sdata, args.out, overwrite=args.overwrite)
    else:  # a patch model is refused there, after the arguments are checked
        expr = _pipeline.predict_slide(
            source,
            args.model,
            pixel_size=args.pixel_size,
            out=args.out,
            overwrite=args.overwrite,
            genes=args.genes,
            n_jobs=args.n_jobs,
        )
    what = "spots" if patches else "cells"
    sys.stdout.write(f"Predicted {expr.n_vars} genes for {expr.n_obs} {what} -> {args.out}\n")


def _patch_settings(model) -> dict:
    """The ``bt.pp.spot_patches`` arguments that cut patches like a patch model's training patches."""
    layout, features = model.config.features["patch_layout"], model.config.features
    return {
        "size_um": layout["token_um"] * layout["grid"],
        "patch_px": layout["patch_px"],
        "scales": layout["scales"],
        "fov": layout["fov"],
        "grid": layout["grid"],
        "encoder": None if features["encoder"] == "pixels" else features["encoder"],
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``bitro`` command."""
    args = _parser().parse_args(argv)
    try:
        run(args)
    # bitro's own one-sentence errors; anything else is a bug and keeps its traceback
    except (OSError, KeyError, TypeError, ValueError, TrainingDivergedError) as e:
        sys.stderr.write(f"bitro {args.command}: error: {e}\n")
        raise SystemExit(2) from None
