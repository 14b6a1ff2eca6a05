"""Synthetic sections written to disk as Space Ranger writes a Visium run: :func:`synthetic_visium`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bitro._logging import logger

if TYPE_CHECKING:
    from spatialdata import SpatialData


def _write_10x_h5(path: Path, counts: np.ndarray, barcodes: list[str], genes: list[str], library_id: str) -> None:
    """A count matrix in the 10x HDF5 layout of Space Ranger >= 3 (genes x barcodes, compressed columns)."""
    import h5py
    import scipy.sparse as sp

    m = sp.csc_matrix(np.asarray(counts).T.astype(np.int32))
    with h5py.File(path, "w") as f:
        f.attrs["library_ids"] = np.array([library_id], dtype="S")
        g = f.create_group("matrix")
        g["barcodes"] = np.array(barcodes, dtype="S")
        g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr
        g["shape"] = np.array(m.shape, dtype=np.int32)
        feat = g.create_group("features")
        feat["id"] = np.array(genes, dtype="S")
        feat["name"] = np.array(genes, dtype="S")
        feat["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")
        feat["genome"] = np.array(["synthetic"] * len(genes), dtype="S")


def synthetic_visium(
    path: str | Path,
    n_samples: int = 3,
    *,
    size: int = 2048,
    spot_diameter_um: float = 55.0,
    spot_pitch_um: float = 100.0,
    seed: int = 0,
) -> SpatialData:
    """Write synthetic sections as Space Ranger output folders, with a QuPath-style GeoJSON of their nuclei.

    For trying the Visium route of bitro without real data: :func:`bitro.datasets.synthetic` generates the
    sections (0.5 µm per pixel), and each is written to ``path / sample`` as Space Ranger writes it, for
    ``spatialdata_io.visium(path / sample, dataset_id=sample, fullres_image_file=f"{sample}_full_image.tif")``:

    - ``filtered_feature_bc_matrix.h5``: the spot counts (10x HDF5 layout);
    - ``spatial/tissue_positions.csv`` (spot centres in full-resolution pixels, every spot in tissue),
      ``spatial/scalefactors_json.json``, ``spatial/tissue_hires_image.png``, ``spatial/tissue_lowres_image.png``;
    - ``{sample}_full_image.tif``: the full-resolution H&E (tiled, zlib), the image one gives Space Ranger;
    - ``{sample}_nuclei.geojson``: the true nucleus outlines as a GeoJSON FeatureCollection in full-resolution
      pixels, as QuPath's "Export objects as GeoJSON" writes them (for :func:`bitro.pp.load_segmentation`).

    Space Ranger does not record the pixel size; measure it from the spots (:func:`bitro.io.set_pixel_size`).

    Parameters
    ----------
    path
        Folder to write into (created; existing files of the same names are overwritten).
    n_samples
        Number of sections (``"synth0"``, ``"synth1"``, ...).
    size
        Image edge in pixels.
    spot_diameter_um, spot_pitch_um
        Spot size and centre-to-centre distance (Visium: 55 and 100 µm).
    seed
        Random seed of :func:`bitro.datasets.synthetic`.

    Returns
    -------
    The generated SpatialData of :func:`bitro.datasets.synthetic`, with the ground truth (table ``"truth"``: each
    nucleus' cell type and true expression, rows ``"{sample}_{i}"`` in the order of the GeoJSON features; ``.var``
    column ``"marker_of"``).

    Examples
    --------
    >>> truth = bt.datasets.synthetic_visium("visium_data", 3)  # doctest: +SKIP
    >>> sdata = spatialdata_io.visium("visium_data/synth0", dataset_id="synth0",
    ...                               fullres_image_file="synth0_full_image.tif")  # doctest: +SKIP
    """
    import pandas as pd
    import scipy.sparse as sp
    import spatialdata as sd
    import tifffile
    import xarray as xr
    from PIL import Image

    from bitro._constants import Key
    from bitro.datasets._synthetic import synthetic
    from bitro.io import get_sections

    root = Path(path)
    synth = synthetic(n_samples, size=size, spot_diameter_um=spot_diameter_um, spot_pitch_um=spot_pitch_um, seed=seed)
    spots = synth["spots"]
    for section in get_sections(synth):
        s = section.sample
        folder = root / s
        (folder / "spatial").mkdir(parents=True, exist_ok=True)
        table = spots[(spots.obs[Key.SAMPLE] == s).to_numpy()]
        barcodes = [f"{s}-{i}" for i in range(table.n_obs)]
        counts = table.X.toarray() if sp.issparse(table.X) else np.asarray(table.X)
        _write_10x_h5(folder / "filtered_feature_bc_matrix.h5", counts, barcodes, list(table.var_names), s)
        x, y = np.asarray(table.obsm[Key.SPATIAL]).T
        pd.DataFrame(
            {
                "barcode": barcodes,
                "in_tissue": 1,
                "array_row": table.obs["array_row"].to_numpy(),
                "array_col": table.obs["array_col"].to_numpy(),
                "pxl_row_in_fullres": np.round(y).astype(int),
                "pxl_col_in_fullres": np.round(x).astype(int),
            }
        ).to_csv(folder / "spatial" / "tissue_positions.csv", index=False)
        image = synth[section.image_key]
        if isinstance(image, xr.DataTree):  # a multiscale image: its full resolution
            image = sd.get_pyramid_levels(image, n=0)
        he = np.ascontiguousarray(np.moveaxis(np.asarray(image.values), 0, -1))  # (y, x, rgb)
        tifffile.imwrite(folder / f"{s}_full_image.tif", he, tile=(256, 256), compression="zlib")
        scalef = {"tissue_hires_scalef": 1000 / size, "tissue_lowres_scalef": 300 / size}
        for name in ("hires", "lowres"):
            edge = round(size * scalef[f"tissue_{name}_scalef"])
            Image.fromarray(he).resize((edge, edge)).save(folder / "spatial" / f"tissue_{name}_image.png")
        radius_px = float(synth[f"{s}_spots"]["radius"].iloc[0])
        (folder / "spatial" / "scalefactors_json.json").write_text(
            json.dumps({**scalef, "spot_diameter_fullres": 2 * radius_px, "fiducial_diameter_fullres": 3 * radius_px})
        )
        with warnings.catch_warnings():  # pixel coordinates have no map projection ("crs") to record
            warnings.filterwarnings("ignore", message=".*crs.*", category=UserWarning)
            synth[Key.true_nuclei(s)][["geometry"]].to_file(folder / f"{s}_nuclei.geojson", driver="GeoJSON")
    logger.info("Wrote %d Space Ranger-format folders to %s.", n_samples, root)
    return synth
