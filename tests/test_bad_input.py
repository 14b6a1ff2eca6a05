"""Bad input and interrupted work (issue #12): every case fails early with one sentence, changes nothing, loses nothing.

``CASES`` lists every bad input tried: the call, the exception it must raise and the words its message must hold.
Each is run by :func:`test_bad_input`, which also checks that the tables passed in were not modified.
``python tests/test_bad_input.py`` prints the table of docs/reliability.md from the real messages.

The fault tests below kill a write at each of its stages (a subprocess ended with ``os._exit`` or a
monkeypatched rename that raises) and check that the previous output is whole and that the next run works.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import bitro as bt

pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = {"dim": 16, "heads": 2, "ff_dim": 32, "max_context": 16, "context_radius": 60.0, "batch_size": 8, "n_members": 1}


@dataclass
class Ctx:
    """What a case may use: fresh copies of the toy tables, a trained model, its saved folder, a scratch folder."""

    spots: object
    cells: object
    model: object
    model_dir: Path
    tmp: Path
    extra: dict = field(default_factory=dict)


@dataclass
class Case:
    id: str
    area: str
    what: str
    call: Callable[[Ctx], object]
    exc: type[BaseException]
    words: tuple[str, ...]


CASES: list[Case] = []


def case(id: str, area: str, what: str, exc: type[BaseException], *words: str):
    def register(fn):
        CASES.append(Case(id, area, what, fn, exc, words))
        return fn

    return register


def fit(ctx: Ctx, **kw):
    return bt.tl.fit(ctx.spots, cells=ctx.cells, **{**TINY, "epochs": 2, **kw})


# -- bt.tl.fit: arguments ---------------------------------------------------------------------------------
for _id, _kw, _exc, _words in [
    ("fit_genes_empty", {"genes": []}, ValueError, ("`genes`", "empty")),
    ("fit_genes_string", {"genes": "G1"}, TypeError, ("`genes`", "list", "['G1']")),
    ("fit_genes_duplicated", {"genes": ["G1", "G1"]}, ValueError, ("`genes`", "more than once")),
    ("fit_genes_unknown", {"genes": ["NOPE"]}, KeyError, ("not in the expression table",)),
    ("fit_heads_zero", {"heads": 0}, ValueError, ("`heads`", "positive integer")),
    ("fit_heads_not_dividing_dim", {"heads": 3}, ValueError, ("divisible by `heads`",)),
    ("fit_epochs_float", {"epochs": 2.7}, TypeError, ("`epochs`", "integer")),
    ("fit_epochs_zero", {"epochs": 0}, ValueError, ("`epochs`", "positive integer")),
    ("fit_seed_negative", {"seed": -1}, ValueError, ("`seed`", ">= 0")),
    ("fit_seed_string", {"seed": "0"}, TypeError, ("`seed`", "integer")),
    ("fit_lr_inf", {"lr": float("inf")}, ValueError, ("`lr`", "finite")),
    ("fit_lr_nan", {"lr": float("nan")}, ValueError, ("`lr`", "finite")),
    ("fit_lr_zero", {"lr": 0.0}, ValueError, ("`lr`",)),
    ("fit_dropout_one", {"dropout": 1.0}, ValueError, ("`dropout`", "[0, 1)")),
    ("fit_weight_decay_negative", {"weight_decay": -1e-4}, ValueError, ("`weight_decay`",)),
    ("fit_batch_size_bool", {"batch_size": True}, TypeError, ("`batch_size`", "integer")),
    ("fit_refit_string", {"refit": "yes"}, TypeError, ("`refit`", "True or False")),
    ("fit_target_cell", {"target": "cell"}, ValueError, ("target='cell'", "not supported")),
    ("fit_scale_unknown", {"scale": "log2"}, ValueError, ("scale='log2'",)),
    ("fit_validation_out_of_range", {"validation": 1.5}, ValueError, ("validation=1.5",)),
    ("fit_model_unknown", {"model": "hist2st"}, ValueError, ("model='hist2st'", "'bitro', 'cmrcnet', 'm2ort'")),
    ("fit_option_of_another_model", {"qkv": "per_level"}, TypeError, ("'qkv' is an option of model='m2ort'",)),
    ("fit_aux_key_missing", {"aux_key": "X_bitro_latent"}, KeyError, ("`.obsm['X_bitro_latent']`", "embed")),
    ("fit_aux_weight_without_aux_key", {"aux_weight": 0.5}, ValueError, ("`aux_weight`", "aux_key")),
    ("fit_field_radii_negative", {"field_radii": [-5.0]}, ValueError, ("`field_radii`", "positive radii")),
    (
        "fit_field_radii_without_transformer",
        {"field_radii": [75.0], "transformer_layers": 0},
        ValueError,
        ("`field_radii`", "transformer_layers=0", "field_radii=()"),
    ),
]:
    case(_id, "fit", f"`fit({', '.join(f'{k}={v!r}' for k, v in _kw.items())})`", _exc, *_words)(
        lambda ctx, kw=_kw: fit(ctx, **kw)
    )


@case(
    "fit_patch_model_on_cells",
    "fit",
    "a patch model (`model='m2ort'`) given the cell table",
    ValueError,
    "reads spot patches",
    "bt.pp.spot_patches",
)
def _(ctx):
    return bt.tl.fit(ctx.spots, cells=ctx.cells, model="m2ort", use_rep="X_bitro", epochs=2)


# -- bt.tl.fit: tables --------------------------------------------------------------------------------------
@case("fit_spot_id_duplicated", "fit", "a spot id twice in a section of the spot table", ValueError, "more than once")
def _(ctx):
    ids = ctx.spots.obs["spot_id"].astype(str).to_numpy()
    ids[1] = ids[0]
    ctx.spots.obs["spot_id"] = ids
    return fit(ctx)


@case(
    "fit_gene_names_duplicated",
    "fit",
    "duplicated gene names in the spot table",
    ValueError,
    "duplicated names",
    "var_names",
)
def _(ctx):
    names = list(ctx.spots.var_names)
    names[1] = names[0]
    ctx.spots.var_names = names
    return fit(ctx)


@case(
    "fit_cell_ids_duplicated",
    "fit",
    "duplicated cell ids in the cell table",
    ValueError,
    "cell table",
    "duplicated names",
)
def _(ctx):
    names = list(ctx.cells.obs_names)
    names[1] = names[0]
    ctx.cells.obs_names = names
    return fit(ctx)


@case("fit_nan_centroids", "fit", "NaN cell centroids", ValueError, "centroids", "NaN or infinite")
def _(ctx):
    xy = np.array(ctx.cells.obsm["spatial"], dtype=float)
    xy[3] = np.nan
    ctx.cells.obsm["spatial"] = xy
    return fit(ctx)


@case("fit_nan_features", "fit", "NaN cell features", ValueError, "features", "finite")
def _(ctx):
    x = np.array(ctx.cells.obsm["X_bitro"])
    x[0, 0] = np.nan
    ctx.cells.obsm["X_bitro"] = x
    return fit(ctx)


def _other_cells(ctx, *, shift: float = 0.0, prefix: str = "", fit_after: bool = True):
    """The cell table of another SpatialData with the same section names (another toy data set)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bitro_conftest", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _, other = module._toy_tl_tables(seed=1)
    other.obsm["spatial"] = np.asarray(other.obsm["spatial"]) + shift
    if prefix:
        ids = other.obs["spot_id"]
        other.obs["spot_id"] = np.where(ids.isna(), None, prefix + ids.astype(str))
    ctx.cells = other
    return fit(ctx) if fit_after else None


def _other_cells_as_the_models(ctx) -> None:
    """Another SpatialData's cell table whose features are prepared as the model's: only the spots disagree."""
    record = ctx.cells.uns["bitro"]["extract_cells"]
    _other_cells(ctx, prefix="B-", fit_after=False)
    ctx.cells.uns["bitro"]["extract_cells"] = record


@case(
    "fit_cells_of_other_sdata_moved",
    "fit",
    "a cell table of another SpatialData (same section names, other image frame)",
    ValueError,
    "nearer another spot",
    "same SpatialData",
)
def _(ctx):
    return _other_cells(ctx, shift=100.0)


@case(
    "fit_cells_of_other_sdata_spots",
    "fit",
    "a cell table of another SpatialData (same section names, other spots)",
    ValueError,
    "not in the spot table",
    "same SpatialData",
)
def _(ctx):
    return _other_cells(ctx, prefix="B-")


@case("fit_negative_counts", "fit", "negative (log-transformed) counts", ValueError, "negative values")
def _(ctx):
    x = np.log1p(np.asarray(ctx.spots.X))
    ctx.spots.X = x - x.mean(axis=0)  # log-transformed and centred, not counts
    return fit(ctx)


@case("fit_nan_counts", "fit", "NaN counts", ValueError, "NaN or infinite")
def _(ctx):
    x = np.array(ctx.spots.X)
    x[0, 0] = np.nan
    ctx.spots.X = x
    return fit(ctx)


@case("fit_empty_table", "fit", "a spot table without rows", ValueError, "empty")
def _(ctx):
    ctx.spots = ctx.spots[:0].copy()
    return fit(ctx)


@case(
    "fit_no_extraction_record", "fit", "a cell table without its extraction record", ValueError, "no extraction record"
)
def _(ctx):
    del ctx.cells.uns["bitro"]["extract_cells"]
    return fit(ctx)


@case("fit_adata_string", "fit", "a path instead of the spot table", TypeError, "AnnData or a SpatialData")
def _(ctx):
    return bt.tl.fit("spots.h5ad", cells=ctx.cells)


@case("fit_cells_string", "fit", "a path instead of the cell table", TypeError, "cell table", "AnnData")
def _(ctx):
    return bt.tl.fit(ctx.spots, cells="cells.h5ad", **TINY)


# -- training that diverges -----------------------------------------------------------------------------------
@case("fit_lr_10_diverges", "fit", "`fit(lr=10)`: the loss explodes", bt.tl.TrainingDivergedError, "diverged", "smaller learning rate")
def _(ctx):
    return fit(ctx, lr=10.0, epochs=6, validation=None)


# -- bt.tl.predict --------------------------------------------------------------------------------------------
@case(
    "predict_model_path", "predict", "a model folder's path instead of the model", TypeError, "`model`", "trained model"
)
def _(ctx):
    return bt.tl.predict(str(ctx.model_dir), ctx.spots, cells=ctx.cells)


@case("predict_data_string", "predict", "a path instead of the data", TypeError, "`data`")
def _(ctx):
    return bt.tl.predict(ctx.model, "sdata.zarr")


@case(
    "predict_no_extraction_record", "predict", "cells without an extraction record", ValueError, "no extraction record"
)
def _(ctx):
    del ctx.cells.uns["bitro"]["extract_cells"]
    return bt.tl.predict(ctx.model, ctx.spots, cells=ctx.cells)


@case(
    "predict_other_features",
    "predict",
    "cells whose features were made otherwise",
    ValueError,
    "crop_um",
    "reference=model",
)
def _(ctx):
    ctx.cells.uns["bitro"]["extract_cells"] = dict(ctx.cells.uns["bitro"]["extract_cells"], crop_um=12.0)
    return bt.tl.predict(ctx.model, ctx.spots, cells=ctx.cells)


@case("predict_spot_id_duplicated", "predict", "a spot id twice in the spot table", ValueError, "more than once")
def _(ctx):
    ids = ctx.spots.obs["spot_id"].astype(str).to_numpy()
    ids[1] = ids[0]
    ctx.spots.obs["spot_id"] = ids
    return bt.tl.predict(ctx.model, ctx.spots, cells=ctx.cells)


@case("predict_tokens_zero", "predict", "`tokens_per_batch=0`", ValueError, "tokens_per_batch")
def _(ctx):
    return bt.tl.predict(ctx.model, ctx.spots, cells=ctx.cells, tokens_per_batch=0)


# -- saved models ---------------------------------------------------------------------------------------------
def _edit_config(ctx, edit):
    file = ctx.model_dir / "config.json"
    config = json.loads(file.read_text())
    edit(config)
    file.write_text(json.dumps(config))
    return bt.tl.load_model(ctx.model_dir)


def _swap_genes(c):
    c["genes"][0], c["genes"][1] = c["genes"][1], c["genes"][0]


@case("model_genes_swapped", "model", "`config.json` with two gene names swapped", ValueError, "changed after", "genes")
def _(ctx):
    return _edit_config(ctx, _swap_genes)


@case("model_zscore_edited", "model", "`config.json` with a z-score mean edited", ValueError, "changed after")
def _(ctx):
    return _edit_config(ctx, lambda c: c["zscore_mean"].__setitem__(0, c["zscore_mean"][0] + 1))


@case("model_n_members_lowered", "model", "`config.json` with `n_members` lowered", ValueError, "changed after")
def _(ctx):
    return _edit_config(ctx, lambda c: c.update(n_members=1))


@case(
    "model_n_members_lowered_no_checksums",
    "model",
    "`n_members` lowered in a model saved without checksums",
    ValueError,
    "2 ensemble members",
    "n_members=1",
)
def _(ctx):
    return _edit_config(ctx, lambda c: (c.update(n_members=1), c.pop("checksums")))


@case("model_target_cell", "model", '`config.json` with `target: "cell"`', ValueError, "target 'cell'", "not one of")
def _(ctx):
    return _edit_config(ctx, lambda c: c.update(target="cell"))


@case(
    "model_zscore_length",
    "model",
    "`config.json` with a z-score list too short",
    ValueError,
    "zscore_std",
    "finite numbers",
)
def _(ctx):
    return _edit_config(ctx, lambda c: c["zscore_std"].pop())


@case("model_genes_duplicated", "model", "`config.json` naming a gene twice", ValueError, "more than once")
def _(ctx):
    return _edit_config(ctx, lambda c: c["genes"].__setitem__(1, c["genes"][0]))


@case(
    "model_n_genes_disagree", "model", "`config.json` whose architecture has another gene count", ValueError, "n_genes"
)
def _(ctx):
    return _edit_config(ctx, lambda c: c["architecture"].update(n_genes=c["architecture"]["n_genes"] + 1))


def _flip_bytes(file: Path, offset_from_end: int = 64) -> None:
    data = bytearray(file.read_bytes())
    for i in range(len(data) - offset_from_end, len(data) - offset_from_end + 8):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


@case("model_weights_flipped", "model", "weights with flipped bytes", ValueError, "checksum", "corrupted")
def _(ctx):
    _flip_bytes(ctx.model_dir / "weights.safetensors")
    return bt.tl.load_model(ctx.model_dir)


@case("model_reference_flipped", "model", "cell reference arrays with flipped bytes", ValueError, "checksum")
def _(ctx):
    _flip_bytes(ctx.model_dir / "reference.safetensors", 16)
    return bt.tl.load_model(ctx.model_dir)


@case(
    "model_weights_nan_no_checksums",
    "model",
    "NaN weights in a model saved without checksums",
    ValueError,
    "NaN or infinite",
    "train the model again",
)
def _(ctx):
    from safetensors.torch import load_file, save_file

    file = ctx.model_dir / "weights.safetensors"
    tensors = load_file(str(file))
    first = next(k for k, t in tensors.items() if t.is_floating_point())
    tensors[first] = tensors[first] * float("nan")
    save_file(tensors, str(file), metadata={"format": "bitro", "n_members": "2"})
    config = json.loads((ctx.model_dir / "config.json").read_text())
    config.pop("checksums")
    (ctx.model_dir / "config.json").write_text(json.dumps(config))
    return bt.tl.load_model(ctx.model_dir)


@case("model_weights_truncated", "model", "truncated weights", ValueError, "corrupted or truncated")
def _(ctx):
    file = ctx.model_dir / "weights.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    return bt.tl.load_model(ctx.model_dir)


@case("model_config_truncated", "model", "a truncated `config.json`", ValueError, "corrupted or truncated")
def _(ctx):
    file = ctx.model_dir / "config.json"
    file.write_text(file.read_text()[:50])
    return bt.tl.load_model(ctx.model_dir)


@case("model_missing", "model", "a folder that does not exist", FileNotFoundError, "no folder")
def _(ctx):
    return bt.tl.load_model(ctx.tmp / "nothing")


@case("model_save_onto_file", "model", "`model.save()` onto a file", FileExistsError, "is a file")
def _(ctx):
    (ctx.tmp / "file").write_text("user data")
    return ctx.model.save(ctx.tmp / "file")


@case("adapters_flipped", "model", "LoRA adapter weights with flipped bytes", ValueError, "checksum", "adapter")
def _(ctx):
    tuned = bt.tl.transfer(ctx.model, ctx.spots, cells=ctx.cells, epochs=1, rank=2, validation=None)
    folder = tuned.save_adapters(ctx.tmp / "adapters")
    _flip_bytes(folder / "adapters.safetensors", 16)
    return bt.tl.load_adapters(ctx.model, folder)


# -- checkpoints ------------------------------------------------------------------------------------------------
@case(
    "checkpoint_longer_run",
    "checkpoint",
    "the checkpoint of a 4-epoch run for `fit(epochs=2)`",
    ValueError,
    "longer run",
    "epochs=2",
)
def _(ctx):
    fit(ctx, epochs=4, checkpoint_dir=ctx.tmp / "ck", validation=None)
    return fit(ctx, epochs=2, checkpoint_dir=ctx.tmp / "ck", validation=None)


@case("checkpoint_other_fit", "checkpoint", "the checkpoint of another fit", ValueError, "different fit")
def _(ctx):
    fit(ctx, epochs=1, checkpoint_dir=ctx.tmp / "ck", validation=None)
    return fit(ctx, epochs=2, checkpoint_dir=ctx.tmp / "ck", validation=None, lr=1e-2)


@case("checkpoint_flipped", "checkpoint", "a checkpoint with flipped bytes", ValueError, "checksum")
def _(ctx):
    fit(ctx, epochs=1, checkpoint_dir=ctx.tmp / "ck", validation=None)
    _flip_bytes(ctx.tmp / "ck" / "member0" / "checkpoint.safetensors")
    return fit(ctx, epochs=2, checkpoint_dir=ctx.tmp / "ck", validation=None)


@case(
    "checkpoint_legacy",
    "checkpoint",
    "a checkpoint of an older bitro (state and weights apart)",
    ValueError,
    "older bitro",
)
def _(ctx):
    folder = ctx.tmp / "ck" / "member0"
    folder.mkdir(parents=True)
    (folder / "checkpoint.json").write_text("{}")
    return fit(ctx, epochs=2, checkpoint_dir=ctx.tmp / "ck", validation=None)


# -- bt.pp.phenotypes, bt.pp.spatial_graph ------------------------------------------------------------------------
@case("phenotypes_n_clusters_zero", "pp", "`phenotypes(n_clusters=0)`", ValueError, "`n_clusters`", "positive integer")
def _(ctx):
    return bt.pp.phenotypes(ctx.cells, n_clusters=0)


@case("phenotypes_n_clusters_float", "pp", "`phenotypes(n_clusters=2.5)`", TypeError, "`n_clusters`", "integer")
def _(ctx):
    return bt.pp.phenotypes(ctx.cells, n_clusters=2.5)


@case("phenotypes_nan_features", "pp", "`phenotypes` on NaN features", ValueError, "NaN or infinite")
def _(ctx):
    x = np.array(ctx.cells.obsm["X_bitro"])
    x[0] = np.nan
    ctx.cells.obsm["X_bitro"] = x
    return bt.pp.phenotypes(ctx.cells)


@case("phenotypes_not_anndata", "pp", "`phenotypes` on a SpatialData's name", TypeError, "`data`", "AnnData")
def _(ctx):
    return bt.pp.phenotypes("cells")


@case("graph_n_neighs_zero", "pp", "`spatial_graph(n_neighs=0)`", ValueError, "`n_neighs`", "positive integer")
def _(ctx):
    return bt.pp.spatial_graph(ctx.cells, n_neighs=0)


@case("graph_nan_centroids", "pp", "`spatial_graph` on NaN centroids", ValueError, "centroids", "NaN or infinite")
def _(ctx):
    xy = np.array(ctx.cells.obsm["spatial"], dtype=float)
    xy[0] = np.nan
    ctx.cells.obsm["spatial"] = xy
    return bt.pp.spatial_graph(ctx.cells)


@case("graph_duplicated_cells", "pp", "`spatial_graph` on duplicated cell ids", ValueError, "duplicated names")
def _(ctx):
    names = list(ctx.cells.obs_names)
    names[1] = names[0]
    ctx.cells.obs_names = names
    return bt.pp.spatial_graph(ctx.cells)


# -- images: bt.tl.color_statistics --------------------------------------------------------------------------------
def _image_sdata(kind: str):
    """A one-section synthetic SpatialData whose H&E image is made grayscale, RGBA, uint16 or float."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    sdata = bt.datasets.synthetic(1, size=256, n_genes=8, n_markers=2)
    key = "synth0_image"
    rgb = np.asarray(sdata.images[key].values)
    arr = {
        "grayscale": rgb[:1],
        "rgba": np.concatenate([rgb, np.full_like(rgb[:1], 255)]),
        "uint16": rgb.astype(np.uint16) * 257,
        "float": rgb.astype(np.float32) / 255,
        "rgb": rgb,
    }[kind]
    image = Image2DModel.parse(
        arr, dims=("c", "y", "x"), transformations=get_transformation(sdata.images[key], get_all=True)
    )
    sdata.images[key] = image
    return sdata


for _kind in ("grayscale", "rgba", "uint16", "float"):
    case(f"color_statistics_{_kind}", "images", f"`color_statistics` on a {_kind} image", ValueError, "8-bit RGB")(
        lambda ctx, kind=_kind: bt.tl.color_statistics(_image_sdata(kind))
    )


# -- documented rejections of bt.tl and bt.pp that had no test ------------------------------------------------------
def _predicted(ctx):
    bt.tl.predict(ctx.model, ctx.spots, cells=ctx.cells, coverage="spots")
    return ctx.spots


for _id, _what, _call, _exc, _words in [
    ("evaluate_not_a_table", "`evaluate` on a path", lambda ctx: bt.tl.evaluate("spots.h5ad"), TypeError, ("AnnData",)),
    (
        "evaluate_no_predictions",
        "`evaluate` before `predict`",
        lambda ctx: bt.tl.evaluate(ctx.spots),
        KeyError,
        ("No predictions", "bt.tl.predict"),
    ),
    (
        "evaluate_library_key_unknown",
        "`evaluate(library_key=...)` naming no column",
        lambda ctx: bt.tl.evaluate(_predicted(ctx), library_key="patient"),
        KeyError,
        ("library_key='patient'", "library_key=None"),
    ),
    (
        "evaluate_key_added_empty",
        "`evaluate(key_added='')`",
        lambda ctx: bt.tl.evaluate(_predicted(ctx), key_added=""),
        ValueError,
        ("key_added",),
    ),
    (
        "pseudobulk_method",
        "`pseudobulk(method='hex')`",
        lambda ctx: bt.tl.pseudobulk(ctx.spots, method="hex"),
        ValueError,
        ("method='hex'",),
    ),
    (
        "pseudobulk_block_size",
        "`pseudobulk(block_size=0)`",
        lambda ctx: bt.tl.pseudobulk(ctx.spots, block_size=0),
        ValueError,
        ("block_size",),
    ),
    (
        "pseudobulk_min_spots",
        "`pseudobulk(min_spots=0)`",
        lambda ctx: bt.tl.pseudobulk(ctx.spots, method="kmeans", min_spots=0),
        ValueError,
        ("min_spots",),
    ),
    (
        "pseudobulk_not_a_table",
        "`pseudobulk` on a path",
        lambda ctx: bt.tl.pseudobulk("spots.h5ad"),
        TypeError,
        ("`data`", "AnnData"),
    ),
    (
        "cross_validate_two_groups",
        "`cross_validate` with 2 sections",
        lambda ctx: bt.tl.cross_validate(ctx.spots[ctx.spots.obs["sample"] != "S2"].copy(), cells=ctx.cells),
        ValueError,
        ("at least 3",),
    ),
    (
        "cross_validate_library_key_unknown",
        "`cross_validate(library_key=...)` naming no column",
        lambda ctx: bt.tl.cross_validate(ctx.spots, cells=ctx.cells, library_key="patient"),
        KeyError,
        ("library_key='patient'",),
    ),
    (
        "cross_validate_no_cells",
        "`cross_validate` on spots without `cells=`",
        lambda ctx: bt.tl.cross_validate(ctx.spots),
        ValueError,
        ("cells=",),
    ),
    (
        "baselines_genes_empty",
        "`add_baselines(genes=[])`",
        lambda ctx: bt.tl.add_baselines(ctx.spots, ctx.spots.copy(), genes=[], scale="cp10k"),
        ValueError,
        ("empty",),
    ),
    (
        "baselines_genes_unknown",
        "`add_baselines` with unknown genes",
        lambda ctx: bt.tl.add_baselines(ctx.spots, ctx.spots.copy(), genes=["NOPE"], scale="cp10k"),
        KeyError,
        ("not in",),
    ),
    (
        "virtual_spots_diameter",
        "`virtual_spots(diameter_um=-1)`",
        lambda ctx: bt.pp.virtual_spots(ctx.cells, diameter_um=-1),
        ValueError,
        ("diameter_um",),
    ),
    (
        "virtual_spots_not_a_table",
        "`virtual_spots` on a path",
        lambda ctx: bt.pp.virtual_spots("x", diameter_um=55),
        TypeError,
        ("`data`",),
    ),
    (
        "transfer_not_a_model",
        "`transfer` of a model folder's path",
        lambda ctx: bt.tl.transfer(str(ctx.model_dir), ctx.spots, cells=ctx.cells),
        TypeError,
        ("`model`", "BitroModel"),
    ),
    (
        "transfer_rank_zero",
        "`transfer(rank=0)`",
        lambda ctx: bt.tl.transfer(ctx.model, ctx.spots, cells=ctx.cells, rank=0),
        ValueError,
        ("`rank`",),
    ),
    (
        "transfer_epochs_float",
        "`transfer(epochs=1.5)`",
        lambda ctx: bt.tl.transfer(ctx.model, ctx.spots, cells=ctx.cells, epochs=1.5),
        TypeError,
        ("`epochs`", "integer"),
    ),
    (
        "transfer_lr_inf",
        "`transfer(lr=inf)`",
        lambda ctx: bt.tl.transfer(ctx.model, ctx.spots, cells=ctx.cells, lr=float("inf")),
        ValueError,
        ("`lr`", "finite"),
    ),
    (
        "transfer_method",
        "`transfer(method='adapter')`",
        lambda ctx: bt.tl.transfer(ctx.model, ctx.spots, cells=ctx.cells, method="adapter"),
        ValueError,
        ("method='adapter'",),
    ),
    (
        "transfer_genes_string",
        "`transfer(genes='G1')`",
        lambda ctx: bt.tl.transfer(ctx.model, ctx.spots, cells=ctx.cells, genes="G1"),
        TypeError,
        ("`genes`", "list"),
    ),
]:
    case(_id, "tl" if not _id.startswith("virtual") else "pp", _what, _exc, *_words)(_call)


# -- bt.io and the slide pipeline: documented rejections -----------------------------------------------------------
def _jpeg(ctx, mode: str = "RGB") -> Path:
    from PIL import Image

    shape = (64, 64, 3) if mode == "RGB" else (64, 64)
    file = ctx.tmp / ("slide.jpg" if mode == "RGB" else "slide.png")
    Image.fromarray(np.full(shape, 200, np.uint8)).save(file)
    return file


def _text_as_jpeg(ctx) -> Path:
    file = ctx.tmp / "notes.jpg"
    file.write_text("not an image")
    return file


for _id, _what, _call, _exc, _words in [
    (
        "read_image_missing",
        "`read_image` of a missing file",
        lambda ctx: bt.io.read_image(ctx.tmp / "none.jpg", pixel_size=0.5),
        FileNotFoundError,
        ("does not exist",),
    ),
    (
        "read_image_pixel_size_negative",
        "`read_image(pixel_size=-1)`",
        lambda ctx: bt.io.read_image(_jpeg(ctx), pixel_size=-1),
        ValueError,
        ("`pixel_size`", "positive"),
    ),
    (
        "read_image_pixel_size_nan",
        "`read_image(pixel_size=nan)`",
        lambda ctx: bt.io.read_image(_jpeg(ctx), pixel_size=float("nan")),
        ValueError,
        ("`pixel_size`",),
    ),
    (
        "read_image_not_an_image",
        "`read_image` of a text file named .jpg",
        lambda ctx: bt.io.read_image(_text_as_jpeg(ctx), pixel_size=0.5),
        ValueError,
        ("Cannot read",),
    ),
    (
        "read_image_grayscale",
        "`read_image` of a grayscale PNG",
        lambda ctx: bt.io.read_image(_jpeg(ctx, "L"), pixel_size=0.5),
        ValueError,
        ("RGB", "Convert"),
    ),
    (
        "read_wsi_missing",
        "`read_wsi` of a missing file",
        lambda ctx: bt.io.read_wsi(ctx.tmp / "none.svs"),
        FileNotFoundError,
        ("does not exist",),
    ),
    ("read_wsi_jpeg", "`read_wsi` of a JPEG", lambda ctx: bt.io.read_wsi(_jpeg(ctx)), ValueError, ("TIFF/SVS",)),
    (
        "read_st_missing_files",
        "`read_st` of a folder without the section's files",
        lambda ctx: bt.io.read_st(ctx.tmp, "A1"),
        FileNotFoundError,
        ("A1.tsv.gz", "A1_selection.tsv"),
    ),
    (
        "her2st_unknown_section",
        "`datasets.her2st(['ZZ'])`",
        lambda ctx: bt.datasets.her2st(["ZZ"]),
        KeyError,
        ("['ZZ']", "available"),
    ),
    (
        "get_sections_no_image",
        "`get_sections` of a SpatialData without images",
        lambda ctx: bt.io.get_sections(__import__("spatialdata").SpatialData()),
        ValueError,
        ("No image",),
    ),
    (
        "set_pixel_size_no_value",
        "`set_pixel_size` without a size",
        lambda ctx: bt.io.set_pixel_size(bt.io.read_image(_jpeg(ctx), pixel_size=0.5), "slide_image"),
        ValueError,
        ("exactly one",),
    ),
    (
        "predict_slide_folder",
        "`predict_slide` of a folder",
        lambda ctx: bt.predict_slide(ctx.tmp),
        ValueError,
        ("is a folder",),
    ),
    (
        "predict_slide_missing",
        "`predict_slide` of a missing file",
        lambda ctx: bt.predict_slide(ctx.tmp / "x.svs"),
        FileNotFoundError,
        ("does not exist",),
    ),
    (
        "predict_slide_pixel_size_zero",
        "`predict_slide(pixel_size=0)`",
        lambda ctx: bt.predict_slide(_jpeg(ctx), pixel_size=0),
        ValueError,
        ("pixel size", "positive"),
    ),
    (
        "predict_slide_jpeg_without_pixel_size",
        "`predict_slide` of a JPEG without its pixel size",
        lambda ctx: bt.predict_slide(_jpeg(ctx)),
        ValueError,
        ("no pixel size", "--pixel-size"),
    ),
    (
        "predict_slide_model_int",
        "`predict_slide(model=123)`",
        lambda ctx: bt.predict_slide(_jpeg(ctx), 123, pixel_size=0.5),
        TypeError,
        ("`model`",),
    ),
    (
        "predict_slide_out_exists",
        "`predict_slide(out=...)` onto an existing folder without `overwrite`",
        lambda ctx: bt.predict_slide(_jpeg(ctx), ctx.model, pixel_size=0.5, out=ctx.tmp),
        FileExistsError,
        ("already exists", "--overwrite"),
    ),
    (
        "predict_slide_gene_unknown",
        "`predict_slide(genes=[...])` naming a gene the model lacks",
        lambda ctx: bt.predict_slide(_jpeg(ctx), ctx.model, pixel_size=0.5, genes=["NOPE"]),
        KeyError,
        ("does not predict",),
    ),
]:
    case(_id, "io", _what, _exc, *_words)(_call)


@case(
    "transfer_cells_of_other_sdata",
    "tl",
    "`transfer` with a cell table of another SpatialData",
    ValueError,
    "not in the spot table",
)
def _(ctx):
    _other_cells_as_the_models(ctx)
    return bt.tl.transfer(ctx.model, ctx.spots, cells=ctx.cells, epochs=1)


# -- images and SpatialData: segment_nuclei, extract_cells, write_zarr ------------------------------------------
for _kind in ("grayscale", "rgba", "uint16", "float"):
    case(f"segment_nuclei_{_kind}", "images", f"`segment_nuclei` on a {_kind} image", ValueError, "8-bit RGB")(
        lambda ctx, kind=_kind: bt.pp.segment_nuclei(_image_sdata(kind))
    )

for _name, _value in (("sigma_um", -1.0), ("sigma_um", 0.0), ("blob_sigma_um", float("nan")), ("min_distance_um", -2)):
    case(
        f"segment_nuclei_{_name}_{_value}",
        "images",
        f"`segment_nuclei({_name}={_value!r})`",
        ValueError,
        f"`{_name}`",
    )(lambda ctx, name=_name, value=_value: bt.pp.segment_nuclei(_image_sdata("rgb"), **{name: value}))


@case("segment_nuclei_anndata", "images", "`segment_nuclei` on an AnnData", TypeError, "SpatialData", "AnnData")
def _(ctx):
    return bt.pp.segment_nuclei(ctx.spots)


@case("extract_cells_anndata", "images", "`extract_cells` on an AnnData", TypeError, "SpatialData")
def _(ctx):
    return bt.pp.extract_cells(ctx.spots)


@case(
    "extract_cells_spot_shapes_duplicated",
    "images",
    "spot shapes with a duplicated index",
    ValueError,
    "spot shapes",
    "duplicated",
)
def _(ctx):
    sdata = bt.datasets.synthetic(1, size=512, n_genes=8, n_markers=2)
    gdf = sdata.shapes["synth0_spots"]
    gdf.index = [gdf.index[0], *gdf.index[:-1]]  # spot 0's id twice: its cells and spot 1's would be merged
    return bt.pp.extract_cells(sdata, shapes_key={"synth0": "synth0_true_nuclei"})


@case("write_zarr_anndata", "io", "`write_zarr` of an AnnData", TypeError, "SpatialData", "AnnData")
def _(ctx):
    return bt.io.write_zarr(ctx.spots, ctx.tmp / "x.zarr")


@case(
    "write_zarr_onto_user_folder",
    "io",
    "`write_zarr(overwrite=True)` onto a folder that is not a zarr store",
    FileExistsError,
    "not a zarr store",
)
def _(ctx):
    (ctx.tmp / "mine").mkdir()
    (ctx.tmp / "mine" / "notes.txt").write_text("user data")
    return bt.io.write_zarr(_image_sdata("rgb"), ctx.tmp / "mine", overwrite=True)


@case(
    "predict_nan_weights",
    "predict",
    "a model whose weights became NaN (in memory)",
    ValueError,
    "NaN or infinite",
    "nothing was written",
)
def _(ctx):
    import copy

    import torch

    model = copy.deepcopy(ctx.model)
    with torch.no_grad():
        next(model.nets[0].parameters()).fill_(float("nan"))
    ctx.extra["spots"] = ctx.spots
    return bt.tl.predict(model, ctx.spots, cells=ctx.cells)


@case(
    "normalize_stain_no_tissue",
    "images",
    "`normalize_stain` of an image without tissue",
    ValueError,
    "no or too little stained tissue",
)
def _(ctx):
    sdata = _image_sdata("rgb")
    image = sdata.images["synth0_image"]
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    blank = np.full((3, 256, 256), 245, np.uint8)
    sdata.images["synth0_image"] = Image2DModel.parse(
        blank, dims=("c", "y", "x"), transformations=get_transformation(image, get_all=True)
    )
    return bt.pp.normalize_stain(sdata)


@case("get_sections_anndata", "io", "`get_sections` of an AnnData", TypeError, "SpatialData", "AnnData")
def _(ctx):
    return bt.io.get_sections(ctx.spots)


@case(
    "predict_cells_of_other_sdata",
    "predict",
    "spots with a cell table of another SpatialData (same section names)",
    ValueError,
    "not in the spot table",
)
def _(ctx):
    _other_cells_as_the_models(ctx)
    return bt.tl.predict(ctx.model, ctx.spots, cells=ctx.cells)


# -- bt.pl ---------------------------------------------------------------------------------------------------------
for _id, _what, _call, _exc, _words in [
    (
        "pl_expression_gene_unknown",
        "`pl.expression` of a gene the table lacks",
        lambda ctx: bt.pl.expression(_predicted(ctx), "NOPE"),
        KeyError,
        ("Gene 'NOPE'",),
    ),
    (
        "pl_expression_sample_unknown",
        "`pl.expression(sample=...)` naming no section",
        lambda ctx: bt.pl.expression(_predicted(ctx), "G1", sample="ZZ"),
        KeyError,
        ("Sample 'ZZ'", "Available"),
    ),
    (
        "pl_expression_not_a_table",
        "`pl.expression` of a path",
        lambda ctx: bt.pl.expression("x", "G1"),
        TypeError,
        ("AnnData or a SpatialData",),
    ),
    (
        "pl_training_string",
        "`pl.training` of a string",
        lambda ctx: bt.pl.training("history"),
        TypeError,
        ("fitted model",),
    ),
    (
        "pl_metrics_before_evaluate",
        "`pl.metrics` before `evaluate`",
        lambda ctx: bt.pl.metrics(ctx.spots),
        KeyError,
        ("bt.tl.evaluate",),
    ),
    (
        "pl_phenotypes_sample_unknown",
        "`pl.phenotypes(sample=...)` naming no section",
        lambda ctx: bt.pl.phenotypes(ctx.cells, sample="ZZ"),
        KeyError,
        ("Sample 'ZZ'",),
    ),
]:
    case(_id, "pl", _what, _exc, *_words)(_call)


# -- TPIR: bt.tl.expression_encoder, align_images, region_classifier, evaluate_regions, bt.pl.regions (issue #16) --
def _counts_table(labels=("tumour", None, "stroma", None), patients=("P1", "P1", "P2", "P2")):
    """A tiny spots x genes table of integer counts with a patient and a (partly missing) region per spot."""
    import anndata as ad
    import pandas as pd

    obs = pd.DataFrame({"patient": list(patients), "region": list(labels)}, index=[f"s{i}" for i in range(4)])
    return ad.AnnData(np.arange(12, dtype=np.float32).reshape(4, 3), obs=obs)


def _embedded_spots(n: int = 12):
    """Spots with image features, an expression embedding, two regions and two sections."""
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {"sample": np.repeat(["S1", "S2"], n // 2), "region": np.tile(["tumour", "stroma"], n // 2)},
        index=[f"s{i}" for i in range(n)],
    )
    a = ad.AnnData(obs=obs)
    a.obsm["X_bitro_image"] = rng.normal(size=(n, 5)).astype(np.float32)
    a.obsm["X_bitro_latent"] = rng.normal(size=(n, 3)).astype(np.float32)
    a.obsm["spatial"] = rng.uniform(0, 100, size=(n, 2))
    return a


def _halved(a):
    a.X = a.X * 0.5
    return a


def _nan_image(a):
    a.obsm["X_bitro_image"][0, 0] = np.nan
    return a


def _classifier():
    return bt.tl.region_classifier(_embedded_spots(), labels_key="region", use_rep="X_bitro_image")


def _saved_classifier(ctx):
    return _classifier().save(ctx.tmp / "region_classifier")


def _truncated(folder, name: str):
    file = folder / name
    file.write_bytes(file.read_bytes()[:40])
    return folder


def _a_file(ctx):
    file = ctx.tmp / "a_file.txt"
    file.write_text("not a folder")
    return file


def _narrow(a):
    a.obsm["X_bitro_image"] = a.obsm["X_bitro_image"][:, :3]
    return a


for _id, _what, _call, _exc, _words in [
    (
        "expression_encoder_not_counts",
        "`expression_encoder` on normalised (non-integer) values",
        lambda ctx: bt.tl.expression_encoder(_halved(_counts_table())),
        ValueError,
        ("non-integer", "raw counts"),
    ),
    (
        "expression_encoder_batch_key_unknown",
        "`expression_encoder(batch_key=...)` naming no column",
        lambda ctx: bt.tl.expression_encoder(_counts_table(), batch_key="donor"),
        KeyError,
        ("`batch_key='donor'`", "columns", "'patient'"),
    ),
    (
        "expression_encoder_labels_key_unknown",
        "`expression_encoder(labels_key=...)` naming no column",
        lambda ctx: bt.tl.expression_encoder(_counts_table(), labels_key="tissue"),
        KeyError,
        ("`labels_key='tissue'`", "columns"),
    ),
    (
        "expression_encoder_unlabeled_collides",
        "`expression_encoder(unlabeled_category=...)` equal to a real label",
        lambda ctx: bt.tl.expression_encoder(_counts_table(), labels_key="region", unlabeled_category="tumour"),
        ValueError,
        ("`unlabeled_category='tumour'`", "also a label"),
    ),
    (
        "expression_encoder_scanvi_without_labels",
        "`expression_encoder(method='scanvi')` without `labels_key`",
        lambda ctx: bt.tl.expression_encoder(_counts_table(), method="scanvi"),
        ValueError,
        ("labels_key",),
    ),
    (
        "load_expression_encoder_missing",
        "`load_expression_encoder` of a folder without an encoder",
        lambda ctx: bt.tl.load_expression_encoder(ctx.tmp),
        FileNotFoundError,
        ("not a saved expression encoder",),
    ),
    (
        "align_images_loss_unknown",
        "`align_images(loss=...)` not a known loss",
        lambda ctx: bt.tl.align_images(_embedded_spots(), loss="triplet"),
        ValueError,
        ("`loss='triplet'`", "'clip', 'bleep'"),
    ),
    (
        "align_images_nan_features",
        "`align_images` on NaN image features",
        lambda ctx: bt.tl.align_images(_nan_image(_embedded_spots())),
        ValueError,
        ("NaN or infinite",),
    ),
    (
        "region_classifier_one_region",
        "`region_classifier` with a single region",
        lambda ctx: bt.tl.region_classifier(
            _embedded_spots()[::2].copy(), labels_key="region", use_rep="X_bitro_image"
        ),
        ValueError,
        ("at least 2",),
    ),
    (
        "evaluate_regions_groups_key_unknown",
        "`evaluate_regions(groups_key=...)` naming no column",
        lambda ctx: bt.tl.evaluate_regions(_embedded_spots(), labels_key="region", groups_key="slide"),
        KeyError,
        ("`groups_key='slide'`", "columns"),
    ),
    (
        "load_region_classifier_missing",
        "`load_region_classifier` of a folder that does not exist",
        lambda ctx: bt.tl.load_region_classifier(ctx.tmp / "nowhere"),
        FileNotFoundError,
        ("no folder there", "RegionClassifier.save"),
    ),
    (
        "load_region_classifier_not_saved",
        "`load_region_classifier` of a folder without a classifier",
        lambda ctx: bt.tl.load_region_classifier(ctx.tmp),
        FileNotFoundError,
        ("not a saved region classifier", "config.json"),
    ),
    (
        "load_region_classifier_truncated",
        "`load_region_classifier` of truncated weights",
        lambda ctx: bt.tl.load_region_classifier(_truncated(_saved_classifier(ctx), "weights.safetensors")),
        ValueError,
        ("corrupted or truncated",),
    ),
    (
        "load_image_aligner_of_a_classifier",
        "`load_image_aligner` of a saved region classifier",
        lambda ctx: bt.tl.load_image_aligner(_saved_classifier(ctx)),
        ValueError,
        ("not the config of a bitro image aligner",),
    ),
    (
        "region_classifier_save_onto_file",
        "`RegionClassifier.save()` onto a file",
        lambda ctx: _classifier().save(_a_file(ctx)),
        FileExistsError,
        ("is a file", "folder"),
    ),
    (
        "region_classifier_other_features",
        "`RegionClassifier.predict` on spots with other image features (wrong width)",
        lambda ctx: _classifier().predict(_narrow(_embedded_spots())),
        ValueError,
        ("has 3 features", "fitted on 5"),
    ),
    (
        "her2st_atlas_regions_not_bool",
        "`datasets.her2st_atlas(regions='yes')`",
        lambda ctx: bt.datasets.her2st_atlas(path=ctx.tmp, regions="yes"),
        TypeError,
        ("`regions`", "True or False"),
    ),
    (
        "her2st_regions_not_bool",
        "`datasets.her2st(regions=1)`",
        lambda ctx: bt.datasets.her2st(["B4"], regions=1),
        TypeError,
        ("`regions`", "True or False"),
    ),
    (
        "pl_regions_before_predict",
        "`pl.regions` before the regions are predicted",
        lambda ctx: bt.pl.regions(_embedded_spots()),
        KeyError,
        ("No regions", "RegionClassifier.predict"),
    ),
]:
    case(_id, "regions", _what, _exc, *_words)(_call)


# -- the runner --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(_toy_tl_cache, tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    spots, cells = _toy_tl_cache
    model = bt.tl.fit(spots.copy(), cells=cells.copy(), **{**TINY, "n_members": 2, "epochs": 2})
    folder = model.save(tmp_path_factory.mktemp("model") / "m")
    return model, folder


def _snapshot(adata) -> tuple:
    x = adata.X if adata.X is None else np.asarray(adata.X).copy()
    return (
        list(adata.obs_names),
        list(adata.var_names),
        {k: v.tolist() for k, v in adata.obs.items()},
        {k: np.asarray(v).copy() for k, v in adata.obsm.items()},
        sorted(adata.uns),
        json.dumps(adata.uns.get("bitro", {}).get("extract_cells", {}).get("fingerprint")),
        x,
    )


def _same(a: tuple, b: tuple) -> bool:
    if a[:3] != b[:3] or a[4:6] != b[4:6] or set(a[3]) != set(b[3]):
        return False
    if not all(np.array_equal(a[3][k], b[3][k], equal_nan=True) for k in a[3]):
        return False
    return (a[6] is None and b[6] is None) or np.array_equal(a[6], b[6], equal_nan=True)


def run_case(c: Case, toy, trained, tmp: Path) -> BaseException:
    """Run one case; returns the exception it raised (fails when it raised none or another type)."""
    spots, cells = toy
    model, folder = trained
    model_dir = tmp / "model"
    shutil.copytree(folder, model_dir)
    ctx = Ctx(spots, cells, model, model_dir, tmp)
    try:
        with pytest.raises(c.exc) as err:
            c.call(ctx)
    finally:
        import matplotlib.pyplot as plt

        plt.close("all")
    return err.value


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input(c: Case, toy_tl, trained, tmp_path):
    spots, cells = toy_tl
    before = (_snapshot(spots), _snapshot(cells))
    model_before = json.dumps(trained[0].config, sort_keys=True, default=str)
    err = run_case(c, (spots, cells), trained, tmp_path)
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    for word in c.words:
        assert word.lower() in text.lower(), f"{word!r} not in: {text}"
    assert "\n" not in text.strip(), "one sentence, one line"
    # a plain Python exception (or bitro's own subclass of one), not one from deep inside a library
    assert type(err).__module__ in ("builtins", "bitro._checks"), type(err)
    # the tables the case started from (and the model) were not modified: cases that change tables do so on copies
    if c.id not in _MUTATING:
        assert _same(_snapshot(spots), before[0]) and _same(_snapshot(cells), before[1])
    assert json.dumps(trained[0].config, sort_keys=True, default=str) == model_before


#: Cases that edit the tables themselves to make them bad (what is checked is that the call changes nothing more).
_MUTATING = {
    "fit_spot_id_duplicated",
    "fit_gene_names_duplicated",
    "fit_cell_ids_duplicated",
    "fit_nan_centroids",
    "fit_nan_features",
    "fit_negative_counts",
    "fit_nan_counts",
    "fit_no_extraction_record",
    "predict_no_extraction_record",
    "predict_other_features",
    "predict_spot_id_duplicated",
    "phenotypes_nan_features",
    "graph_nan_centroids",
    "graph_duplicated_cells",
    "evaluate_library_key_unknown",  # predicted first, then evaluated badly
    "evaluate_key_added_empty",
    "pl_expression_gene_unknown",
    "pl_expression_sample_unknown",
}


def test_bad_calls_leave_mutated_tables_as_they_were(toy_tl, trained, tmp_path):
    """A bad call changes nothing more than the case did itself: no prediction slot, no phenotype, no graph."""
    spots, cells = toy_tl
    ids = spots.obs["spot_id"].astype(str).to_numpy()
    ids[1] = ids[0]
    spots.obs["spot_id"] = ids
    before = (_snapshot(spots), _snapshot(cells))
    with pytest.raises(ValueError, match="more than once"):
        bt.tl.predict(trained[0], spots, cells=cells)
    assert _same(_snapshot(spots), before[0]) and _same(_snapshot(cells), before[1])
    assert "bitro_predicted" not in spots.obsm
    x = np.array(cells.obsm["X_bitro"])
    x[0] = np.nan
    cells.obsm["X_bitro"] = x
    before = _snapshot(cells)
    with pytest.raises(ValueError):
        bt.pp.phenotypes(cells)
    assert _same(_snapshot(cells), before) and "phenotypes" not in cells.uns["bitro"]


# == fault tests: a write killed at each of its stages loses nothing, and the next run works ======================
class Killed(BaseException):
    """Stands for the process being stopped at that instant (nothing after it runs in that frame)."""


def _nets_equal(a, b) -> bool:
    import torch

    return all(
        all(torch.equal(x, y) for x, y in zip(na.state_dict().values(), nb.state_dict().values(), strict=True))
        for na, nb in zip(a.nets, b.nets, strict=True)
    )


CKPT = {**TINY, "epochs": 4, "patience": 4, "validation": "sample"}


@pytest.mark.parametrize("stage", ["writing", "before_rename", "after_first_rename", "after_rename"])
def test_checkpoint_killed_at_each_stage_resumes_to_the_same_model(stage, toy_tl, tmp_path, monkeypatch):
    """A fit stopped while writing its 3rd checkpoint resumes to exactly the model of an uninterrupted fit.

    ``after_first_rename`` stops right after the first file of the checkpoint is renamed into place: bitro before
    issue #12 renamed the weights there and wrote the state file after, so that stop resumed from a mix.
    """
    import safetensors.torch

    import bitro.tl._train as train_module

    spots, cells = toy_tl
    full = bt.tl.fit(spots, cells=cells, checkpoint_dir=tmp_path / "full", **CKPT)
    calls = {"n": 0}
    save_file, replace, save_checkpoint = safetensors.torch.save_file, Path.replace, train_module.save_checkpoint

    def counting_save_checkpoint(*a, **kw):
        calls["n"] += 1
        save_checkpoint(*a, **kw)
        if stage == "after_rename" and calls["n"] == 3:
            raise Killed

    def partial_save_file(tensors, filename, metadata=None):
        if stage == "writing" and calls["n"] == 3:
            Path(filename).write_bytes(b"\x00" * 100)  # half-written temporary file
            raise Killed
        save_file(tensors, filename, metadata=metadata)

    def failing_replace(self, target):
        if stage == "before_rename" and calls["n"] == 3 and Path(target).name == "checkpoint.safetensors":
            raise Killed
        out = replace(self, target)
        if stage == "after_first_rename" and calls["n"] == 3:
            raise Killed
        return out

    monkeypatch.setattr(train_module, "save_checkpoint", counting_save_checkpoint)
    monkeypatch.setattr(safetensors.torch, "save_file", partial_save_file)
    monkeypatch.setattr(Path, "replace", failing_replace)
    with pytest.raises(Killed):
        bt.tl.fit(spots, cells=cells, checkpoint_dir=tmp_path / "cut", **CKPT)
    monkeypatch.undo()
    resumed = bt.tl.fit(spots, cells=cells, checkpoint_dir=tmp_path / "cut", **CKPT)
    assert _nets_equal(resumed, full)
    assert resumed.history == full.history


def _toy_store_script() -> str:
    return textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("_bitro_conftest", {str(REPO / "tests" / "conftest.py")!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        spots, cells = module._toy_tl_tables()
        """
    )


def test_fit_killed_by_sigkill_resumes_to_the_same_model(toy_tl, tmp_path):
    """A real process killed (SIGKILL) at an arbitrary moment of training, then resumed: the same model."""
    import signal
    import time

    spots, cells = toy_tl
    kw = {**CKPT, "epochs": 8, "patience": 8}
    code = _toy_store_script() + textwrap.dedent(
        f"""
        import torch, bitro as bt
        torch.set_num_threads(1)
        bt.settings.progress = False
        bt.tl.fit(spots, cells=cells, checkpoint_dir={str(tmp_path / "cut")!r}, **{kw!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = tmp_path / "cut" / "member0" / "checkpoint.safetensors"
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere in the next epochs, possibly while a checkpoint is written
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert state.exists(), proc.stderr.read().decode()[-2000:]
    full = bt.tl.fit(spots, cells=cells, checkpoint_dir=tmp_path / "full", **kw)
    resumed = bt.tl.fit(spots, cells=cells, checkpoint_dir=tmp_path / "cut", **kw)
    assert _nets_equal(resumed, full)


#: Code run in a subprocess before a write: ``os._exit`` (no clean-up runs) at the given stage of bitro's
#: write-aside-and-swap (bitro._atomic), or in the middle of writing the new output.
KILL_AT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import bitro._atomic as A

    STAGE = sys.argv[1]
    _swap, _remove = A.swap_in, A._remove

    def swap_in(tmp, path):
        if STAGE == "written":  # the new output is complete aside, nothing renamed yet
            os._exit(9)
        if STAGE == "between_renames":  # the old output moved aside, the new one not yet in place
            path.rename(A.sibling(path, "old"))
            os._exit(9)
        _swap(tmp, path)

    def remove(p):
        if STAGE == "removing_old" and ".old-" in p.name:  # the new output in place, the old one not yet removed
            os._exit(9)
        _remove(p)

    A.swap_in, A._remove = swap_in, remove
    """
)
STAGES = ["writing", "written", "between_renames", "removing_old"]


def _run_killed(code: str, stage: str) -> None:
    res = subprocess.run([sys.executable, "-c", KILL_AT + code, stage], capture_output=True, text=True, timeout=300)
    assert res.returncode == 9, res.stderr[-3000:]


@pytest.mark.parametrize("stage", STAGES)
def test_model_save_killed_at_each_stage(stage, trained, tmp_path):
    """`model.save` onto an existing model, killed at each stage: the old model (or the new one) is whole."""
    from bitro._atomic import leftovers

    model, folder = trained
    old = tmp_path / "m"
    shutil.copytree(folder, old)
    (tmp_path / "new").mkdir()
    new_model = bt.tl.load_model(folder)
    new_model.history = [{"train_loss": [1.0]}, {"train_loss": [2.0]}]  # something to tell the saves apart
    new_model.save(tmp_path / "new" / "m")
    code = textwrap.dedent(
        f"""
        import bitro as bt
        if STAGE == "writing":
            import safetensors.torch as st
            def save_file(tensors, filename, metadata=None):
                Path(filename).write_bytes(b"partial")
                os._exit(9)
            st.save_file = save_file
        bt.tl.load_model({str(tmp_path / "new" / "m")!r}).save({str(old)!r})
        """
    )
    _run_killed(code, stage)
    assert leftovers(old), "the killed save left its temporary sibling"
    loaded = bt.tl.load_model(old)  # the old model, or (killed while removing the old one) the new one, whole
    expected = [{"train_loss": [1.0]}, {"train_loss": [2.0]}] if stage == "removing_old" else model.history
    assert loaded.history == expected and _nets_equal(loaded, model)
    new_model.save(old)  # the next save works and clears what the killed one left
    assert bt.tl.load_model(old).history == new_model.history and not leftovers(old)


#: Stops of a save into a folder that also holds other files: while the new files are written aside, right after
#: they were committed (renamed to ``.bitro-save.pending`` inside the folder), and after the first file was moved.
SHARED_STAGES = ["writing", "committed", "mid_renames"]


@pytest.mark.parametrize("stage", SHARED_STAGES)
def test_model_save_into_a_shared_folder_killed_at_each_stage(stage, trained, tmp_path):
    """`model.save` into a folder that holds the user's other files, killed at each stage: nothing mixed, nothing lost."""
    model, folder = trained
    shared = tmp_path / "project"
    shutil.copytree(folder, shared)
    (shared / "notes.txt").write_text("the user's own file")
    new_model = bt.tl.load_model(folder)
    new_model.history = [{"train_loss": [1.0]}, {"train_loss": [2.0]}]
    new_model.save(tmp_path / "new")
    code = textwrap.dedent(
        f"""
        import pathlib
        import bitro as bt
        _rename, _replace = pathlib.Path.rename, pathlib.Path.replace
        def rename(self, target):
            out = _rename(self, target)
            if STAGE == "committed" and pathlib.Path(target).name == ".bitro-save.pending":
                os._exit(9)
            return out
        def replace(self, target):
            out = _replace(self, target)
            if STAGE == "mid_renames" and self.parent.name == ".bitro-save.pending":
                os._exit(9)
            return out
        pathlib.Path.rename, pathlib.Path.replace = rename, replace
        if STAGE == "writing":
            import safetensors.torch as st
            def save_file(tensors, filename, metadata=None):
                Path(filename).write_bytes(b"partial")
                os._exit(9)
            st.save_file = save_file
        bt.tl.load_model({str(tmp_path / "new")!r}).save({str(shared)!r})
        """
    )
    _run_killed(code, stage)
    loaded = bt.tl.load_model(shared)  # the old model before the commit, the new one (completed by the load) after
    expected = model.history if stage == "writing" else new_model.history
    assert loaded.history == expected
    assert (shared / "notes.txt").read_text() == "the user's own file"
    new_model.save(shared)  # the next save works and leaves only the model files and the user's
    assert sorted(p.name for p in shared.iterdir()) == sorted([*(p.name for p in folder.iterdir()), "notes.txt"])


def _store_table(path: Path):
    import spatialdata as sd

    from bitro.tl._targets import dense

    return dense(sd.read_zarr(path)["spots"].X)


@pytest.mark.parametrize("stage", STAGES)
def test_write_zarr_killed_at_each_stage(stage, tmp_path):
    """`write_zarr(overwrite=True)` killed at each stage: the old store (or the new one) is whole; the next write works."""
    from bitro._atomic import leftovers, recover

    dst = tmp_path / "s.zarr"
    bt.io.write_zarr(bt.datasets.synthetic(1, size=128, n_genes=4, n_markers=1, seed=1), dst)
    old = _store_table(dst)
    code = textwrap.dedent(
        f"""
        import bitro as bt
        from spatialdata import SpatialData
        if STAGE == "writing":
            def write(self, file_path, **kw):
                Path(file_path).mkdir()
                (Path(file_path) / "zarr.json").write_text("{{}}")  # a store begun, never finished
                os._exit(9)
            SpatialData.write = write
        bt.io.write_zarr(bt.datasets.synthetic(1, size=128, n_genes=4, n_markers=1, seed=2), {str(dst)!r}, overwrite=True)
        """
    )
    _run_killed(code, stage)
    assert leftovers(dst), "the killed write left its temporary sibling"
    recover(dst)  # what the next write does first: a store moved aside comes back
    new = bt.datasets.synthetic(1, size=128, n_genes=4, n_markers=1, seed=2)
    from bitro.tl._targets import dense

    expected = dense(new["spots"].X) if stage == "removing_old" else old
    np.testing.assert_array_equal(_store_table(dst), expected)
    bt.io.write_zarr(new, dst, overwrite=True)
    np.testing.assert_array_equal(_store_table(dst), dense(new["spots"].X))
    assert not leftovers(dst)


def test_demo_overwrite_killed_keeps_the_previous_output(tmp_path):
    """`bitro demo --out DIR --overwrite` killed once it has begun its work leaves DIR whole, user files included.

    The process is killed (SIGKILL) as soon as it starts writing (its hidden sibling of DIR appears; before the
    fix of issue #12, as soon as DIR was emptied), then half a second into that work.
    """
    import signal
    import time

    from bitro._atomic import leftovers

    out = tmp_path / "demo"
    out.mkdir()
    (out / "metrics.csv").write_text("held_out,method\nC3,bitro\n")
    (out / "notes.txt").write_text("the user's own file")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bitro", "demo", "--out", str(out), "--overwrite", "--epochs", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if leftovers(out) or not (out / "notes.txt").exists():
            break
        time.sleep(0.02)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "notes.txt"]
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert leftovers(out), "the demo was killed while writing (its hidden sibling is left for the next run to clean)"


def test_demo_failing_midway_keeps_the_previous_output(tmp_path, monkeypatch):
    """The demo stopped in the middle of its work (after reading, while building cells): DIR untouched, no leftover."""
    from bitro import _pipeline
    from bitro._atomic import leftovers

    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")

    def stop(*a, **kw):
        raise Killed

    monkeypatch.setattr(_pipeline, "cell_table", stop)
    with pytest.raises(Killed):
        _pipeline.demo(out, overwrite=True, samples=["B4", "C2", "C3"])
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and not leftovers(out)


@pytest.mark.parametrize("stage", ["between_renames"])  # the other stages: test_write_zarr_killed_at_each_stage
def test_cli_read_overwrite_killed_keeps_the_previous_store(stage, tmp_path, her2st_dir):
    """`bitro read ... --out STORE --overwrite` killed while swapping its output: STORE is whole, the rerun works."""
    import spatialdata as sd

    from bitro._atomic import leftovers, recover

    folder = tmp_path / "st"
    folder.mkdir()
    for name in ("B4.jpg", "B4.tsv.gz", "B4_selection.tsv"):
        shutil.copy(her2st_dir / name, folder / name)
    store = tmp_path / "b4.zarr"
    old = bt.datasets.synthetic(1, size=128, n_genes=4, n_markers=1)
    bt.io.write_zarr(old, store)
    code = f"from bitro._cli import main\nmain(['read', {str(folder)!r}, '--out', {str(store)!r}, '--overwrite'])\n"
    _run_killed(code, stage)
    recover(store)  # what the next write does first
    assert list(sd.read_zarr(store).images) == list(old.images)  # the previous store, whole
    from bitro._cli import main

    main(["read", str(folder), "--out", str(store), "--overwrite"])
    assert "B4_image" in sd.read_zarr(store).images and not leftovers(store)


# == the docs page's table ========================================================================================
#: The fault tests, as docs/reliability.md lists them (what was stopped, at which stages).
FAULT_TESTS = {
    "test_checkpoint_killed_at_each_stage_resumes_to_the_same_model": 4,
    "test_fit_killed_by_sigkill_resumes_to_the_same_model": 1,
    "test_model_save_killed_at_each_stage": len(STAGES),
    "test_model_save_into_a_shared_folder_killed_at_each_stage": len(SHARED_STAGES),
    "test_write_zarr_killed_at_each_stage": len(STAGES),
    "test_demo_overwrite_killed_keeps_the_previous_output": 1,
    "test_demo_failing_midway_keeps_the_previous_output": 1,
    "test_cli_read_overwrite_killed_keeps_the_previous_store": 1,
}


def _message(err: BaseException) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def markdown_table() -> str:
    """The table of docs/reliability.md: every case of :data:`CASES` with the message bitro gives today."""
    import tempfile

    import torch

    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("_bitro_conftest", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bt.settings.progress = False
    base = module._toy_tl_tables()
    rows = ["| # | area | bad input | error | message |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as d:
        spots, cells = base[0].copy(), base[1].copy()
        model = bt.tl.fit(spots, cells=cells, **{**TINY, "n_members": 2, "epochs": 2})
        folder = model.save(Path(d) / "model0")
        for i, c in enumerate(CASES, 1):
            tmp = Path(d) / f"case{i}"
            tmp.mkdir()
            shutil.copytree(folder, tmp / "model")
            ctx = Ctx(base[0].copy(), base[1].copy(), model, tmp / "model", tmp)
            try:
                c.call(ctx)
                got, text = "none", "(no error: the case FAILS)"
            except BaseException as e:  # noqa: BLE001
                got, text = type(e).__name__, _message(e)
            text = text.replace(d, "…").replace("|", "\\|")
            rows.append(f"| {i} | {c.area} | {c.what} (`{c.id}`) | `{got}` | {text} |")
    return "\n".join(rows)


def test_docs_page_lists_every_case():
    """docs/reliability.md names every case and gives the numbers of this file."""
    page = (REPO / "docs" / "reliability.md").read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in page]
    assert not missing, f"docs/reliability.md lacks {missing}; regenerate it: python tests/test_bad_input.py"
    assert f"**{len(CASES)}** bad inputs" in page and f"**{len(CASES)}** clear errors" in page
    assert f"**{sum(FAULT_TESTS.values())}** interrupted writes" in page


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")


def test_leftovers_of_live_writers_are_kept_and_dead_ones_cleaned(tmp_path):
    """The clean-up never touches a write in progress in another process, and takes the old format too."""
    import signal

    from bitro._atomic import leftovers, recover

    path = tmp_path / "s.zarr"
    path.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = tmp_path / f".s.zarr.tmp-{live.pid}-0123abcd"  # another process is writing this right now
        dead = tmp_path / ".s.zarr.tmp-999999999-0123abcd"
        legacy = tmp_path / ".s.zarr.tmp-89abcdef"  # bitro < 0.3: no process id
        other = tmp_path / ".t.zarr.tmp-999999999-0123abcd"  # a leftover of another path
        for p in (mine, dead, legacy, other):
            p.mkdir()
        assert leftovers(path) == sorted([mine, dead, legacy])
        recover(path)
        assert leftovers(path) == [mine] and other.exists() and path.exists()
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
