"""The HER2ST breast cancer dataset (Andersson et al. 2021): four sections bundled, more from a folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from bitro._constants import Key
from bitro._logging import logger
from bitro._settings import settings

if TYPE_CHECKING:
    from spatialdata import SpatialData

#: The sections shipped inside the package.
BUNDLED_DIR = Path(__file__).parent / "data" / "her2st"
GENES_FILE = "genes_hist2st_785.txt"
_SELECTION_SUFFIX = "_selection.tsv"

CITATION = {
    "name": "HER2ST",
    "citation": (
        "Andersson A, Larsson L, Stenbeck L, et al. Spatial deconvolution of HER2-positive breast cancer "
        "delineates tumor-associated cell type interactions. Nat Commun 12, 6012 (2021)."
    ),
    "doi": "10.1038/s41467-021-26271-2",
    "source": "https://github.com/almaan/her2st (data/)",
    "genes": "genes_hist2st_785.txt from the BiTro authors' repository (demo_data/Gene/BRCA.txt)",
}


def _data_dir(path: str | Path | None) -> Path:
    if path is not None:
        return Path(path)
    return Path(settings.data_dir) if settings.data_dir is not None else BUNDLED_DIR


def choose_sections(samples: Sequence[str] | str | None, found: list[str], folder: Path) -> list[str]:
    """The sections asked for (all of ``found`` by default), each once and each in ``found`` (else one sentence)."""
    samples = found if samples is None else [samples] if isinstance(samples, str) else list(samples)
    samples = [str(s) for s in samples]
    if len(set(samples)) < len(samples):
        msg = f"`samples` lists a section more than once: {samples}."
        raise ValueError(msg)
    missing = [s for s in samples if s not in found]
    if missing or not samples:
        msg = f"Sections {missing or '[] (none asked for)'} not found in {str(folder)!r}; available: {found}."
        raise KeyError(msg)
    return samples


def available_sections(folder: Path) -> list[str]:
    """Section ids of every complete legacy ST section (counts, coordinates, image) in ``folder``, sorted."""
    from bitro.io._st import IMAGE_SUFFIXES

    samples = []
    for sel in sorted(folder.glob(f"*{_SELECTION_SUFFIX}")):
        s = sel.name[: -len(_SELECTION_SUFFIX)]
        if (folder / f"{s}.tsv.gz").is_file() and any((folder / f"{s}{x}").is_file() for x in IMAGE_SUFFIXES):
            samples.append(s)
    return samples


def her2st(
    samples: Sequence[str] | str | None = None, *, path: str | Path | None = None, regions: bool = False
) -> SpatialData:
    """HER2-positive breast tumour sections on legacy ST arrays (Andersson et al., Nat Commun 2021).

    Four sections ship with bitro (B4 of patient B; C2, C3, C4 of patient C). Other sections of the
    study, in the same format, are read from ``path`` or from ``bitro.settings.data_dir`` (the
    environment variable ``BITRO_HER2ST_DIR``). Each section is read with :func:`bitro.io.read_st`
    (images lazy; the pixel size measured from the spots).

    Parameters
    ----------
    samples
        Section ids to load (e.g. ``["B4", "C2"]``); all sections found by default.
    path
        Folder with the sections (``{S}.tsv.gz``, ``{S}_selection.tsv``, ``{S}.jpg``); default
        ``bitro.settings.data_dir``, else the bundled copy.
    regions
        Also read the pathologist's region of each spot from ``pathologist/{S}.tsv`` in the same folder (the
        study's ``data/ST-pat/lbl`` files; one section per patient is labelled) into
        ``.obs["region_pathologist"]``: NaN for unlabelled and "undetermined" spots, and for sections without a
        file (logged). The bundled sections have none; with the full study (``BITRO_HER2ST_DIR``) the regions
        classified from H&E can be scored against a pathologist, leave one patient out
        (:func:`bitro.tl.evaluate_regions` with ``labels_key="region_pathologist"``).

    Returns
    -------
    One SpatialData with, per section ``S``, the image ``"{S}_image"``, the spot circles
    ``"{S}_spots"`` and the coordinate systems ``"{S}"`` / ``"{S}_um"``, plus one table ``"spots"``
    (raw counts of all sections, genes outer-joined with 0) with the citation and provenance in
    ``.uns["bitro"]["dataset"]`` and each section's reader parameters in ``.uns["bitro"]["read_st"]``;
    with ``regions=True`` also ``.obs["region_pathologist"]`` (categorical).

    Examples
    --------
    >>> import bitro as bt
    >>> sdata = bt.datasets.her2st(["B4", "C2"])
    >>> sdata["spots"].obs["sample"].value_counts().to_dict()
    {'B4': 283, 'C2': 187}
    """
    from spatialdata import SpatialData

    from bitro.io._build import spots_table
    from bitro.io._st import read_st_section

    if not isinstance(regions, bool):
        msg = f"`regions` must be True or False, got {regions!r}."
        raise TypeError(msg)
    folder = _data_dir(path)
    if not folder.is_dir():
        msg = f"The HER2ST folder {str(folder)!r} does not exist; check `path=` or BITRO_HER2ST_DIR."
        raise FileNotFoundError(msg)
    found = available_sections(folder)
    if not found:
        msg = (
            f"No section found in {str(folder)!r}: a section 'S' needs 'S.tsv.gz', 'S_selection.tsv' and 'S.jpg' "
            "side by side."
        )
        raise FileNotFoundError(msg)
    samples = choose_sections(samples, found, folder)

    images, shapes, adatas, params = {}, {}, [], {}
    for s in tqdm(samples, desc="HER2ST sections", disable=not settings.progress):
        img, spots, adata, p = read_st_section(folder, s, pixel_size=None, spot_diameter_um=100.0, array_pitch_um=200.0)
        images[Key.image(s)], shapes[Key.spots(s)] = img, spots
        adatas.append(adata)
        params[s] = p
    table = spots_table(adatas)
    table.uns[Key.UNS] = {
        Key.DATASET: {**CITATION, "path": str(folder.resolve()), "samples": samples},
        Key.READ_ST: params,
    }
    if regions:
        from bitro.datasets._atlas import pathologist_column

        table.obs[Key.REGION_PATHOLOGIST], missing = pathologist_column(folder, samples, table.obs_names)
        if missing:
            logger.warning("No pathologist labels (pathologist/{S}.tsv) in %s for sections %s.", folder, missing)
    logger.info("HER2ST: %d sections, %d spots, %d genes.", len(samples), table.n_obs, table.n_vars)
    return SpatialData(images=images, shapes=shapes, tables={Key.SPOTS_TABLE: table})


def her2st_genes(*, path: str | Path | None = None) -> list[str]:
    """The 785 genes that Hist2ST, HisToGene and BiTro predict on HER2ST.

    Parameters
    ----------
    path
        Folder holding ``genes_hist2st_785.txt``; by default ``bitro.settings.data_dir`` when it has
        the file, else the bundled copy.

    Returns
    -------
    Gene symbols, in the file's order.

    Examples
    --------
    >>> import bitro as bt
    >>> len(bt.datasets.her2st_genes())
    785
    """
    folder = _data_dir(path)
    file = folder / GENES_FILE
    if not file.is_file():
        if path is not None:
            msg = f"{str(file)!r} not found; the gene list is '{GENES_FILE}', one symbol per line."
            raise FileNotFoundError(msg)
        file = BUNDLED_DIR / GENES_FILE
    return [g for g in (line.strip() for line in file.read_text().splitlines()) if g]
