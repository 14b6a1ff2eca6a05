"""The end-to-end pipelines behind ``bitro demo``, ``bitro predict`` (:func:`predict_slide`) and the other steps."""

from __future__ import annotations

import difflib
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitro._checks import StainFitError
from bitro._constants import Key
from bitro._logging import logger

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData
    from spatialdata import SpatialData

    from bitro.tl import BitroModel

#: Genes shown in the demo figures.
DEMO_GENES = ("ERBB2", "EPCAM")


def check_output_dir(out: str | Path, *, overwrite: bool) -> Path:
    """Refuse an existing output folder unless ``overwrite``; checked before any work is done."""
    out = Path(out)
    if out.exists() and not overwrite:
        msg = f"Output folder {str(out)!r} already exists. Choose another folder or pass --overwrite to replace it."
        raise FileExistsError(msg)
    if out.exists() and not out.is_dir():
        msg = f"Output path {str(out)!r} exists and is not a folder."
        raise FileExistsError(msg)
    return out


def cell_table(
    sdata: SpatialData,
    *,
    stain: str | None = "macenko",
    encoder: str = "handcrafted",
    n_clusters: int = 8,
    n_neighs: int = 8,
    n_jobs: int | None = None,
) -> None:
    """Stain normalisation, nucleus segmentation, cell features, phenotypes and the cell graph, in place."""
    import bitro as bt

    # Nuclei are segmented on the original images (the haematoxylin threshold is fitted per section);
    # the cell features are read from the stain-normalised images, so that they compare across sections.
    image_keys = {s.sample: s.image_key for s in bt.io.get_sections(sdata)}
    bt.pp.segment_nuclei(sdata, image_key=image_keys, n_jobs=n_jobs)
    if stain is not None:
        bt.pp.normalize_stain(sdata, method=stain)
        image_keys = {s: Key.normalized(k) for s, k in image_keys.items()}
    cells = bt.pp.extract_cells(sdata, image_key=image_keys, encoder=encoder, n_jobs=n_jobs)
    bt.pp.phenotypes(cells, n_clusters=n_clusters)
    bt.pp.spatial_graph(cells, n_neighs=n_neighs)


def demo(
    out: str | Path = "bitro_demo",
    *,
    test_sample: str = "C3",
    samples: Sequence[str] | None = None,
    overwrite: bool = False,
    epochs: int = 20,
    n_jobs: int | None = None,
) -> pd.DataFrame:
    """Run the whole pipeline on the bundled HER2ST sections and write the results to ``out``.

    Reads the sections, normalises stains, segments nuclei, builds the cell table (features,
    phenotypes, kNN graph), fits a spot model on every section but ``test_sample``, predicts the
    held-out section, scores it beside the trivial baselines and writes the SpatialData
    (``sdata.zarr``), the metrics table (``metrics.csv``) and figures (``*.png``) to ``out``.

    Returns
    -------
    The metrics table.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    import bitro as bt
    from bitro.io._lazy_image import clear_cache
    from bitro.tl import add_baselines

    out = check_output_dir(out, overwrite=overwrite)
    sdata = bt.datasets.her2st(samples)
    all_samples = [s.sample for s in bt.io.get_sections(sdata)]
    if test_sample not in all_samples:
        msg = f"Held-out section {test_sample!r} is not among the sections {all_samples}."
        raise ValueError(msg)
    if len(all_samples) < 3:
        msg = f"The demo needs at least 3 sections (2 to train and validate, 1 to test); got {all_samples}."
        raise ValueError(msg)
    # written into a hidden sibling of `out` and swapped in at the end: the previous output stays whole until then
    with staged_folder(out, overwrite=overwrite) as tmp:
        t0 = time.perf_counter()
        cell_table(sdata, n_jobs=n_jobs)
        clear_cache()  # the last decoded section image: not needed while the model trains
        cells, spots = sdata[Key.CELLS_TABLE], sdata[Key.SPOTS_TABLE]
        logger.info("Cell table: %d cells in %.0f s.", cells.n_obs, time.perf_counter() - t0)

        # the 785 genes of Hist2ST/BiTro, plus the demo's marker genes (ERBB2, EPCAM are not among them)
        genes = [g for g in dict.fromkeys([*bt.datasets.her2st_genes(), *DEMO_GENES]) if g in spots.var_names]
        held_out = (spots.obs[Key.SAMPLE] == test_sample).to_numpy()
        model = bt.tl.fit(spots[~held_out].copy(), target="spot", cells=cells, genes=genes, epochs=epochs)
        model.save(tmp / "model")
        # predictions for every spot and cell of every section (sdata["spots"], "bitro_spots", "bitro_cells");
        # only the held-out section is scored
        bt.tl.predict(model, sdata)
        bt.tl.color_statistics(sdata)
        test = spots[held_out].copy()
        add_baselines(spots[~held_out].copy(), test, genes=model.genes, scale=model.scale)
        metrics = pd.concat(
            [
                bt.tl.evaluate(test, layer=layer, scale=model.scale, library_key=None, key_added=f"{layer}_eval").assign(
                    method=method, held_out=test_sample
                )
                for method, layer in (
                    ("bitro", Key.PREDICTED),
                    ("mean", Key.BASELINE_MEAN),
                    ("ridge", Key.BASELINE_RIDGE),
                )
            ],
            ignore_index=True,
        )
        metrics = metrics[["held_out", "method", *[c for c in metrics.columns if c not in ("held_out", "method")]]]
        metrics.to_csv(tmp / "metrics.csv", index=False)
        # the stain-normalised images are lazy views that can be recomputed: not written
        keep = [name for _, name, _ in sdata.gen_elements() if not name.endswith(Key.NORMALIZED_SUFFIX)]
        bt.io.write_zarr(sdata.subset(keep, filter_tables=False), tmp / "sdata.zarr")

        for gene in DEMO_GENES:
            if gene in model.genes:
                bt.pl.expression(sdata, gene, sample=test_sample, cells=True)
                plt.savefig(tmp / f"expression_{gene}.png", dpi=120, bbox_inches="tight")
                plt.close("all")
        bt.pl.phenotypes(sdata, sample=test_sample)
        plt.savefig(tmp / "phenotypes.png", dpi=120, bbox_inches="tight")
        bt.pl.metrics(test, key=f"{Key.PREDICTED}_eval")
        plt.savefig(tmp / "metrics.png", dpi=120, bbox_inches="tight")
        bt.pl.training(model)
        plt.savefig(tmp / "training.png", dpi=120, bbox_inches="tight")
        plt.close("all")
    logger.info("Demo finished in %.0f s; results in %s.", time.perf_counter() - t0, out)
    return metrics


# -- predicting a new slide ---------------------------------------------------------------------------------

#: Files read with :func:`bitro.io.read_wsi` (pixel size from the file's metadata); other images with
#: :func:`bitro.io.read_image` (pixel size required).
WSI_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".ome.tif", ".ome.tiff")
#: Default model of :func:`predict_slide`.
DEFAULT_MODEL = "her2st"
#: How many genes the figures of :func:`predict_slide` show by default.
N_FIGURE_GENES = 2


def is_wsi(path: str | Path) -> bool:
    """Whether ``path`` is read as a (pyramidal) TIFF / SVS slide rather than a flat image."""
    return Path(path).name.lower().endswith(WSI_SUFFIXES)


def check_slide(image: str | Path, pixel_size: float | None) -> Path:
    """The slide file, checked before any work: it exists, and a flat image (JPEG, PNG) comes with a pixel size."""
    path = Path(image)
    if path.is_dir():
        msg = f"{str(path)!r} is a folder; give an image file (JPEG/PNG, TIFF/OME-TIFF/SVS) or use `bt.tl.predict` on a SpatialData."
        raise ValueError(msg)
    if not path.is_file():
        msg = f"The slide {str(path)!r} does not exist."
        raise FileNotFoundError(msg)
    if pixel_size is not None and not (isinstance(pixel_size, int | float) and 0 < pixel_size < float("inf")):
        msg = f"The pixel size must be a positive number of micrometres per pixel, got {pixel_size!r}."
        raise ValueError(msg)
    if pixel_size is None and not is_wsi(path):
        msg = (
            f"{path.name} records no pixel size and bitro does not guess it: pass --pixel-size UM "
            "(Python: `pixel_size=`), the micrometres per pixel of the scan (about 0.5 at 20x, 0.25 at 40x)."
        )
        raise ValueError(msg)
    return path


def read_slide(image: str | Path, *, pixel_size: float | None = None, sample: str | None = None) -> SpatialData:
    """A one-section SpatialData of an image file: :func:`bitro.io.read_wsi` for TIFF / SVS, else :func:`bitro.io.read_image`."""
    import bitro as bt

    path = check_slide(image, pixel_size)
    if is_wsi(path):
        return bt.io.read_wsi(path, sample=sample, pixel_size=pixel_size)
    return bt.io.read_image(path, pixel_size=pixel_size, sample=sample)


def resolve_model(model: Any) -> BitroModel:
    """A trained model from a model, a saved model folder or a bundled model's name."""
    import bitro as bt

    if isinstance(model, str | Path):
        return bt.tl.load_model(model)
    if not hasattr(model, "cell_reference"):
        msg = f"`model` must be a trained model, a model folder or a bundled model's name, got {type(model).__name__}."
        raise TypeError(msg)
    return model


def stain_reference_record(sdata: SpatialData) -> dict[str, Any] | None:
    """The stain reference the images of ``sdata`` were normalised to (:func:`bitro.pp.normalize_stain`), in full.

    Refitted on the recorded reference image (deterministic: the same stain matrix), because the record keeps
    only the stain matrix and applying a reference needs its white point too. A model keeps it as
    ``config.stain_reference``, so that new slides are normalised to the same colours. ``None`` when the
    images were not normalised, or the reference image is not in ``sdata``.
    """
    import numpy as np

    from bitro.pp._squidpy import import_squidpy
    from bitro.pp._stain import _ensure_tissue_mask

    sqi = import_squidpy().experimental.im

    records = sdata.attrs.get(Key.UNS, {}).get(Key.NORMALIZE_STAIN, {})
    if not records:
        return None
    record = next(iter(records.values()))
    key = record.get("reference")
    if key is None or key not in sdata.images:
        logger.warning(
            "The stain reference image %r is not in the SpatialData: the model records no stain reference, and new "
            "slides will not be stain-normalised for it.",
            key,
        )
        return None
    ref = sqi.fit_stain_reference(sdata, key, method=record["method"], tissue_mask_key=_ensure_tissue_mask(sdata, key))
    if not np.allclose(ref.stain_matrix, record["reference_stain_matrix"], atol=1e-6):
        logger.warning("Refitting the stain reference of %r gave another stain matrix; none recorded.", key)
        return None
    out: dict[str, Any] = {"method": record["method"], "image": key}
    for name in ("stain_matrix", "white_point", "max_concentrations"):
        value = getattr(ref, name, None)
        if value is not None:
            out[name] = np.asarray(value, dtype=float).tolist()
    return out


def stain_reference(model: BitroModel) -> Any:
    """The stain reference the model's training images were normalised to (``config.stain_reference``), or ``None``."""
    import numpy as np

    record = model.config.stain_reference
    if not record:
        return None
    from bitro.pp._squidpy import import_squidpy

    sqi = import_squidpy().experimental.im

    arrays = {
        k: np.asarray(record[k], dtype=float)
        for k in ("stain_matrix", "white_point", "max_concentrations")
        if k in record
    }
    return sqi.StainReference(method=record["method"], **arrays)


def normalize_to_model(sdata: SpatialData, model: BitroModel, image_keys: dict[str, str]) -> dict[str, str]:
    """Normalise the stains of the images ``image_keys`` (sample -> image) to the model's stain reference, in place.

    Returns the images to read cell features from: the normalised ones, or the originals when the model records no
    stain reference, or (with a warning) when no stain vectors can be fitted on a slide at any pyramid level, so
    that the slide is still predicted, from colours the model may not know.
    """
    import bitro as bt

    reference = stain_reference(model)
    if reference is None:
        return image_keys
    normalized = {}
    for sample, key in image_keys.items():
        try:
            bt.pp.normalize_stain(sdata, method=reference.method, reference=reference, image_key=key)
        except StainFitError as e:
            logger.warning("Section %r is predicted without stain normalisation: %s", sample, e)
            normalized[sample] = key
        else:
            normalized[sample] = Key.normalized(key)
    return normalized


def prepare_cells(sdata: SpatialData, model: BitroModel, *, n_neighs: int = 8, n_jobs: int | None = None) -> AnnData:
    """A new slide's cell table, made the way the model's training cells were, in place.

    Segments nuclei on the original images, normalises the stains to the model's stain reference (if its
    training images were normalised), extracts the cell features with the model's encoder and its training
    cells' scaler + PCA (``extract_cells(reference=model)``), assigns the model's phenotypes
    (``phenotypes(reference=model)``) and builds the cell graph.

    Returns
    -------
    The cell table ``sdata["cells"]``.
    """
    import bitro as bt

    record = model.cell_reference.get(Key.EXTRACT_CELLS)
    if record is None:
        msg = "The model carries no record of its training cells' features, so new cells cannot be made to match them."
        raise ValueError(msg)
    image_keys = {s.sample: s.image_key for s in bt.io.get_sections(sdata)}
    bt.pp.segment_nuclei(sdata, image_key=image_keys, n_jobs=n_jobs)
    image_keys = normalize_to_model(sdata, model, image_keys)
    cells = bt.pp.extract_cells(
        sdata,
        image_key=image_keys,
        encoder=record["encoder"],
        crop_um=float(record["crop_um"]),
        crop_px=int(record["crop_px"]),
        add_morphology=bool(record["add_morphology"]),
        reference=model,
        n_jobs=n_jobs,
    )
    if Key.PHENOTYPES in model.cell_reference:
        bt.pp.phenotypes(cells, reference=model)
    bt.pp.spatial_graph(cells, n_neighs=n_neighs)
    return cells


def figure_genes(model: BitroModel, genes: Sequence[str] | None = None) -> list[str]:
    """Genes to draw: ``genes`` (checked against the model), else ERBB2 / EPCAM if predicted, else the best-scored."""
    import numpy as np

    if genes is not None:
        genes = [genes] if isinstance(genes, str) else list(genes)
        missing = [g for g in genes if g not in model.genes]
        if missing:
            hint = difflib.get_close_matches(missing[0], model.genes, n=3)
            msg = (
                f"The model does not predict {missing}"
                + (f" (did you mean {hint}?)" if hint else "")
                + f"; it predicts {len(model.genes)} genes, listed in `model.genes`."
            )
            raise KeyError(msg)
        return genes
    shown = [g for g in DEMO_GENES if g in model.genes]
    if shown:
        return shown
    scores = model.config.gene_scores or {}
    if scores:
        values = np.asarray(next(iter(scores.values())), dtype=float)
        order = np.argsort(-np.nan_to_num(values, nan=-np.inf), kind="stable")
        return [model.genes[i] for i in order[:N_FIGURE_GENES]]
    return model.genes[:N_FIGURE_GENES]


def draw_gene(sdata: SpatialData, expr: AnnData, gene: str, sample: str, file: Path, *, scale: str) -> None:
    """A PNG of the predicted expression of ``gene``: virtual spots and cells over the H&E.

    Drawn by :func:`bitro.pl.expression`; should that fail, the cells alone as points coloured by the gene.
    """
    import matplotlib.pyplot as plt  # the user's backend is left as it is (a notebook keeps its inline figures)
    import numpy as np

    import bitro as bt
    from bitro.pl._expression import SCALE_LABELS

    try:
        fig = bt.pl.expression(sdata, gene, sample=sample, table_key=Key.PREDICTED_SPOTS_TABLE, cells=True)[0].figure
    except (KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
        logger.warning("bt.pl.expression could not draw %s (%s); drawing the cells alone.", gene, e)
        rows = (expr.obs[Key.SAMPLE].astype(str) == sample).to_numpy()
        xy = np.asarray(expr.obsm[Key.SPATIAL])[rows]
        values = np.asarray(expr[rows, gene].X).ravel()
        order = np.argsort(values, kind="stable")
        fig, ax = plt.subplots(figsize=(6, 6))
        sc = ax.scatter(xy[order, 0], xy[order, 1], c=values[order], s=1.5, cmap="viridis", linewidths=0)
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.set_axis_off()
        fig.colorbar(sc, ax=ax, shrink=0.7, label=f"predicted {gene}, {SCALE_LABELS.get(scale, scale)}")
        ax.set_title(f"{gene} — predicted cells ({sample})")
    fig.savefig(file, dpi=120, bbox_inches="tight")
    plt.close(fig)  # only the figure drawn here


@contextmanager
def staged_folder(out: str | Path, *, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write into, swapped in place of ``out`` only once everything is written.

    An existing ``out`` is refused without ``overwrite``; with it, the old folder is removed only after the
    new one is complete, so an error or a crash while writing leaves it untouched.
    """
    from bitro._atomic import recover, staged

    recover(Path(out).absolute())  # a previous run killed while swapping: its old output comes back first
    out = check_output_dir(out, overwrite=overwrite).absolute()
    with staged(out) as tmp:
        yield tmp


def predict_slide(
    image: str | Path,
    model: BitroModel | str | Path = DEFAULT_MODEL,
    *,
    pixel_size: float | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    genes: Sequence[str] | None = None,
    n_jobs: int | None = None,
) -> AnnData:
    """Predict the expression of every cell of an H&E slide that has no spatial data, from the image file alone.

    Reads the image, segments the nuclei, prepares the cells the way the model's training cells were
    (stain normalisation to the model's reference, the model's encoder, its scaler + PCA and phenotype
    centroids), builds the cell graph and predicts every tissue cell with :func:`bitro.tl.predict` (from
    virtual spots of the training spot size laid over the tissue). This is ``bitro predict SLIDE``.

    Parameters
    ----------
    image
        The slide: a pyramidal TIFF, OME-TIFF or SVS (read with :func:`bitro.io.read_wsi`; the pixel size
        comes from its metadata) or a flat image such as JPEG or PNG (read with :func:`bitro.io.read_image`).
    model
        A trained model, a saved model folder, or the name of a model shipped with bitro (``"her2st"``:
        HER2+ breast cancer, see its model card ``bitro/datasets/models/her2st/MODEL_CARD.md``).
    pixel_size
        Micrometres per pixel of the image. Required for JPEG / PNG (bitro does not guess it); for TIFF / SVS
        it overrides the file's value.
    out
        Folder to write the results to (nothing is written by default): ``sdata.zarr`` (the SpatialData:
        image, nuclei, cell table, virtual spots and the prediction tables ``"bitro_spots"`` and
        ``"bitro_cells"``), ``cells.h5ad`` (the returned cell expression table) and ``expression_{gene}.png``
        per gene of ``genes``.
    overwrite
        Replace an existing ``out``. The old folder is removed only once the new one is complete.
    genes
        Genes to draw (default: ERBB2 and EPCAM if the model predicts them, else its best-scored genes).
    n_jobs
        Local processes for the image work (default ``bitro.settings.n_jobs``).

    Returns
    -------
    The cell expression table: cells x the model's genes, ``X`` on the model's target scale (``model.scale``,
    e.g. log1p CP10k; levels are relative, see the model card); ``.obs`` ``"sample"``, ``"phenotype"``,
    ``"cell_id"``; ``.obsm["spatial"]`` the nucleus centroids in image pixels; ``.var`` the model's per-gene
    scores (e.g. ``"loso_pcc"``), if it has any. See :func:`bitro.tl.predict`.

    Examples
    --------
    >>> import bitro as bt
    >>> model = bt.tl.load_model("her2st")  # doctest: +SKIP
    >>> expr = bt.predict_slide("my_slide.svs", model, out="my_slide_bitro")  # doctest: +SKIP
    >>> expr.to_df()["ERBB2"].describe()  # doctest: +SKIP
    """
    import bitro as bt
    from bitro.tl._predict import reads_patches

    t0 = time.perf_counter()
    # everything that can be checked is checked before the slow work
    path = check_slide(image, pixel_size)
    if out is not None:
        check_output_dir(out, overwrite=overwrite)
    model = resolve_model(model)
    if reads_patches(model):
        msg = (
            f"model={model.config.model!r} predicts spots from their image patches, not the cells of a slide: cut "
            "patches around spots (`bt.pp.spot_patches`) and use `bt.tl.predict` (or `bitro predict` on a store)."
        )
        raise ValueError(msg)
    if model.config.patch_key is not None:
        msg = (
            "This model reads each spot's patch embedding (`patch_key` of bt.tl.fit) beside its cells, and a slide "
            "without spots has none: use a model trained without `patch_key`."
        )
        raise ValueError(msg)
    shown = figure_genes(model, genes) if out is not None or genes is not None else []

    sdata = read_slide(path, pixel_size=pixel_size)
    sample = bt.io.get_sections(sdata)[0].sample
    prepare_cells(sdata, model, n_jobs=n_jobs)
    expr = bt.tl.predict(model, sdata)
    logger.info(
        "Predicted %d genes for %d cells of %s in %.0f s.", expr.n_vars, expr.n_obs, path.name, time.perf_counter() - t0
    )
    if out is None:
        return expr
    with staged_folder(out, overwrite=overwrite) as tmp:
        # the stain-normalised images are lazy views of the original that can be recomputed: not written
        keep = [name for _, name, _ in sdata.gen_elements() if not name.endswith(Key.NORMALIZED_SUFFIX)]
        bt.io.write_zarr(sdata.subset(keep, filter_tables=False), tmp / "sdata.zarr")
        expr.write_h5ad(tmp / "cells.h5ad")
        for gene in shown:
            draw_gene(sdata, expr, gene, sample, tmp / f"expression_{gene}.png", scale=model.scale)
    logger.info("Wrote %s (%.0f s in all).", out, time.perf_counter() - t0)
    return expr
