"""The ``bitro`` command line: the demo, and the pipeline steps for batch use on many slides.

Every step reads and writes SpatialData zarr stores, so steps can run as separate jobs
(one per slide on a cluster, for example)::

    bitro read  ST_FOLDER --samples A1 A2 --out sections.zarr
    bitro cells sections.zarr --out cells.zarr
    bitro fit   cells.zarr --model model/ --target spot
    bitro predict cells.zarr --model model/ --out predicted.zarr
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


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
    c.add_argument("--stain", choices=["macenko", "vahadane", "none"], default="macenko")
    c.add_argument("--encoder", default="handcrafted", help="Cell encoder (default: handcrafted).")
    c.add_argument("--n-clusters", type=int, default=8)
    c.add_argument("--n-jobs", type=int, default=None)
    c.add_argument("--overwrite", action="store_true")

    f = sub.add_parser("fit", help="Fit a BiTro model on the spots (or bulk table) of a store.")
    f.add_argument("store", help="SpatialData zarr store with a cell table.")
    f.add_argument("--model", required=True, help="Folder to save the model to.")
    f.add_argument("--target", choices=["spot", "bulk"], default="spot")
    f.add_argument("--samples", nargs="*", default=None, help="Train on these sections only.")
    f.add_argument("--genes", default=None, help="Text file with one gene symbol per line.")
    f.add_argument("--epochs", type=int, default=100)
    f.add_argument("--overwrite", action="store_true")

    q = sub.add_parser("predict", help="Predict expression with a saved model.")
    q.add_argument("store", help="SpatialData zarr store with a cell table.")
    q.add_argument("--model", required=True, help="Folder of a saved model.")
    q.add_argument("--target", choices=["spot", "bulk"], default="spot")
    q.add_argument("--out", required=True, help="Output zarr store.")
    q.add_argument("--overwrite", action="store_true")
    return p


def _read(store: str):
    import spatialdata as sd

    path = Path(store)
    if not path.exists():
        msg = f"No SpatialData store at {store!r}."
        raise FileNotFoundError(msg)
    return sd.read_zarr(path)


def _table_for(sdata, target: str):
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
        sdata = _read(args.store)
        _pipeline.cell_table(
            sdata,
            stain=None if args.stain == "none" else args.stain,
            encoder=args.encoder,
            n_clusters=args.n_clusters,
            n_jobs=args.n_jobs,
        )
        bt.io.write_zarr(sdata, args.out, overwrite=args.overwrite)
    elif args.command == "fit":
        if Path(args.model).exists() and not args.overwrite:
            msg = f"{args.model!r} exists; pass --overwrite to replace it."
            raise FileExistsError(msg)
        sdata = _read(args.store)
        adata = _table_for(sdata, args.target)
        if args.samples:
            adata = adata[adata.obs[Key.SAMPLE].isin(args.samples)].copy()
        genes = Path(args.genes).read_text().split() if args.genes else None
        model = bt.tl.fit(adata, target=args.target, cells=sdata[Key.CELLS_TABLE], genes=genes, epochs=args.epochs)
        model.save(args.model)
    elif args.command == "predict":
        if Path(args.out).exists() and not args.overwrite:
            msg = f"{args.out!r} exists; pass --overwrite to replace it."
            raise FileExistsError(msg)
        model = bt.tl.load_model(args.model)
        sdata = _read(args.store)
        bt.tl.predict(model, _table_for(sdata, args.target), cells=sdata[Key.CELLS_TABLE])
        bt.io.write_zarr(sdata, args.out, overwrite=args.overwrite)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``bitro`` command."""
    args = _parser().parse_args(argv)
    try:
        run(args)
    except (FileExistsError, FileNotFoundError, KeyError, ValueError) as e:
        sys.stderr.write(f"bitro {args.command}: error: {e}\n")
        raise SystemExit(2) from None
