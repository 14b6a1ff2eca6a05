"""The end-to-end pipeline behind ``bitro demo`` and the ``bitro`` command-line steps."""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bitro._constants import Key
from bitro._logging import logger

if TYPE_CHECKING:
    import pandas as pd
    from spatialdata import SpatialData

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
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    t0 = time.perf_counter()
    cell_table(sdata, n_jobs=n_jobs)
    cells, spots = sdata[Key.CELLS_TABLE], sdata[Key.SPOTS_TABLE]
    logger.info("Cell table: %d cells in %.0f s.", cells.n_obs, time.perf_counter() - t0)

    # the 785 genes of Hist2ST/BiTro, plus the demo's marker genes (ERBB2, EPCAM are not among them)
    genes = [g for g in dict.fromkeys([*bt.datasets.her2st_genes(), *DEMO_GENES]) if g in spots.var_names]
    held_out = (spots.obs[Key.SAMPLE] == test_sample).to_numpy()
    model = bt.tl.fit(spots[~held_out].copy(), target="spot", cells=cells, genes=genes, epochs=epochs)
    model.save(out / "model")
    # predictions for every section (written into sdata["spots"]); only the held-out one is scored
    bt.tl.predict(model, spots, cells=cells)
    bt.tl.colour_statistics(sdata)
    test = spots[held_out].copy()
    add_baselines(spots[~held_out].copy(), test, genes=model.genes, scale=model.scale)
    metrics = pd.concat(
        [
            bt.tl.evaluate(test, layer=layer, scale=model.scale, groupby=None, key_added=f"{layer}_eval").assign(
                method=method, held_out=test_sample
            )
            for method, layer in (("bitro", Key.PREDICTED), ("mean", Key.BASELINE_MEAN), ("ridge", Key.BASELINE_RIDGE))
        ],
        ignore_index=True,
    )
    metrics = metrics[["held_out", "method", *[c for c in metrics.columns if c not in ("held_out", "method")]]]
    metrics.to_csv(out / "metrics.csv", index=False)
    # the stain-normalised images are lazy views that can be recomputed: not written
    keep = [name for _, name, _ in sdata.gen_elements() if not name.endswith(Key.NORMALIZED_SUFFIX)]
    bt.io.write_zarr(sdata.subset(keep, filter_tables=False), out / "sdata.zarr", overwrite=overwrite)

    for gene in DEMO_GENES:
        if gene in model.genes:
            bt.pl.expression(sdata, gene, sample=test_sample, cells=True)
            plt.savefig(out / f"expression_{gene}.png", dpi=120, bbox_inches="tight")
            plt.close("all")
    bt.pl.phenotypes(sdata, sample=test_sample)
    plt.savefig(out / "phenotypes.png", dpi=120, bbox_inches="tight")
    bt.pl.metrics(test, key=f"{Key.PREDICTED}_eval")
    plt.savefig(out / "metrics.png", dpi=120, bbox_inches="tight")
    bt.pl.training(model)
    plt.savefig(out / "training.png", dpi=120, bbox_inches="tight")
    plt.close("all")
    logger.info("Demo finished in %.0f s; results in %s.", time.perf_counter() - t0, out)
    return metrics
