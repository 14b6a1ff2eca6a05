"""The HER2ST expression atlas: 34 sections of 8 patients (Andersson et al. 2021), counts only, no images."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from bitro._constants import Key
from bitro._logging import logger
from bitro._settings import settings
from bitro.datasets._her2st import CITATION, choose_sections

if TYPE_CHECKING:
    from anndata import AnnData

#: Environment variable naming the atlas folder.
ATLAS_ENV = "BITRO_HER2ST_ATLAS_DIR"
#: The atlas folder's name when it lies beside the HER2ST sections folder (``bitro.settings.data_dir``).
ATLAS_DIR_NAME = "her2st_atlas"
#: ``.obs`` column of each spot's patient (the section id's letter).
PATIENT = "patient"
#: The pathologist's label that marks no region; read as missing (NaN).
UNDETERMINED = "undetermined"
_SECTION = re.compile(r"^([A-Za-z]+)\d+$")


def atlas_dir(path: str | Path | None) -> Path:
    """The atlas folder: ``path``, else ``$BITRO_HER2ST_ATLAS_DIR``, else ``her2st_atlas`` beside ``settings.data_dir``."""
    if path is not None:
        return Path(path)
    if os.environ.get(ATLAS_ENV):
        return Path(os.environ[ATLAS_ENV])
    if settings.data_dir is not None:
        return Path(settings.data_dir).parent / ATLAS_DIR_NAME
    msg = (
        "No HER2ST atlas folder given: pass `path=` (the folder with `counts/` and `spots/`), or set the environment "
        f"variable {ATLAS_ENV}, or put a '{ATLAS_DIR_NAME}' folder beside `bitro.settings.data_dir`."
    )
    raise FileNotFoundError(msg)


def _read_section(folder: Path, sample: str) -> AnnData:
    """Raw counts of one atlas section, the spots in both the counts and the selection file."""
    import anndata as ad
    import scipy.sparse as sp

    from bitro.io._st import _read_coordinates, _read_counts

    counts = _read_counts(folder / "counts" / f"{sample}.tsv.gz")
    selection = folder / "spots" / f"{sample}_selection.tsv"
    if selection.is_file():
        coords = _read_coordinates(selection)
        spots = counts.index.intersection(coords.index, sort=False)
        if len(spots) < len(counts):
            logger.info("Atlas section %r: %d spots not under tissue dropped.", sample, len(counts) - len(spots))
        counts = counts.loc[spots]
    values = counts.to_numpy()
    if not np.isfinite(values).all() or (values < 0).any():
        msg = f"The counts of atlas section {sample!r} hold negative or non-finite values; expected raw UMI counts."
        raise ValueError(msg)
    xy = np.array([s.split("x") for s in counts.index], dtype=int).reshape(-1, 2)
    patient = _SECTION.match(sample)
    obs = pd.DataFrame(
        {
            Key.SAMPLE: sample,
            PATIENT: patient.group(1) if patient else sample,
            Key.SPOT_ID: counts.index.astype(str),
            Key.ARRAY_ROW: xy[:, 1],
            Key.ARRAY_COL: xy[:, 0],
        },
        index=pd.Index([f"{sample}_{s}" for s in counts.index]),
    )
    return ad.AnnData(
        sp.csr_matrix(values.astype(np.float32)), obs=obs, var=pd.DataFrame(index=counts.columns.astype(str))
    )


def pathologist_regions(folder: Path, sample: str, obs_names: pd.Index) -> pd.Series | None:
    """The pathologist's region of each spot of ``sample`` (``pathologist/{S}.tsv``), NaN where none; None without a file.

    The file's ``x``, ``y`` are adjusted array coordinates: rounded, they give the count rows' ``{x}x{y}`` names.
    ``"undetermined"`` and rows without coordinates are left out (missing).
    """
    file = folder / "pathologist" / f"{sample}.tsv"
    if not file.is_file():
        return None
    lab = pd.read_csv(file, sep="\t")
    if not {"x", "y", "label"} <= set(lab.columns):
        msg = f"{str(file)!r} needs the columns 'x', 'y' and 'label' (got {list(lab.columns)})."
        raise ValueError(msg)
    lab = lab[(lab["label"] != UNDETERMINED) & lab["x"].notna() & lab["y"].notna() & lab["label"].notna()]
    names = pd.Index([f"{sample}_{round(x)}x{round(y)}" for x, y in zip(lab["x"], lab["y"], strict=True)])
    found = names.isin(obs_names)
    logger.info("Section %r: %d of %d labelled spots matched to counts.", sample, int(found.sum()), len(lab))
    out = pd.Series(np.nan, index=obs_names, dtype=object)
    matched = names[found]
    out[matched[~matched.duplicated()]] = lab["label"].astype(str).to_numpy()[found][~matched.duplicated()]
    return out


def pathologist_column(folder: Path, samples: Sequence[str], obs_names: pd.Index) -> tuple[pd.Categorical, list[str]]:
    """The pathologist's regions of the ``samples``' spots (``obs_names``) as one categorical.

    Also the samples without a ``pathologist/{S}.tsv`` file (their spots are missing).
    """
    region = pd.Series(np.nan, index=obs_names, dtype=object)
    missing = []
    for s in samples:
        part = pathologist_regions(folder, s, obs_names)
        if part is None:
            missing.append(s)
        else:
            region = region.where(part.isna(), part)
    return pd.Categorical(region.to_numpy(), categories=sorted(region.dropna().unique())), missing


def her2st_atlas(
    samples: Sequence[str] | str | None = None, *, path: str | Path | None = None, regions: bool = False
) -> AnnData:
    """Raw counts of the HER2ST expression atlas: 34 sections of 8 patients (A-H), expression only.

    The sections of Andersson et al. (Nat Commun 2021) as the authors published them (two sections of patient C
    are absent; images exist for only four, which :func:`bitro.datasets.her2st` reads). Use it as an
    expression-only reference, e.g. for the gene basis of :func:`bitro.tl.reduced_rank_ridge`, leaving out
    the sections of the patients held out from training. Only spots listed in the section's
    ``spots/{S}_selection.tsv`` (under tissue) are kept, when that file exists.

    Parameters
    ----------
    samples
        Section ids to load (e.g. ``["A1", "B2"]``); all sections found by default.
    path
        The atlas folder, holding ``counts/{S}.tsv.gz`` (spots x genes, row names ``{x}x{y}``) and
        ``spots/{S}_selection.tsv``. By default the environment variable ``BITRO_HER2ST_ATLAS_DIR``, else a
        folder ``her2st_atlas`` beside ``bitro.settings.data_dir`` (``BITRO_HER2ST_DIR``).

    Returns
    -------
    Spots x genes of all sections (sparse float32 raw counts, genes outer-joined with 0, sorted by name),
    with ``.obs["sample"]`` (the section), ``.obs["patient"]`` (its letter), ``.obs["spot_id"]``
    (``"{x}x{y}"``), ``.obs["array_row"]``/``.obs["array_col"]``, and the citation in
    ``.uns["bitro"]["dataset"]``; with ``regions=True`` also ``.obs["region"]``. No images and no spot pixel
    coordinates.

    Examples
    --------
    >>> import bitro as bt
    >>> atlas = bt.datasets.her2st_atlas(path="../shared/data/her2st_atlas")  # doctest: +SKIP
    >>> reference = atlas[atlas.obs["patient"] != "C"].copy()  # for a model tested on C3  # doctest: +SKIP
    >>> labelled = bt.datasets.her2st_atlas(["A1", "B1"], path="../shared/data/her2st_atlas", regions=True)  # doctest: +SKIP
    >>> labelled.obs["region"].value_counts()  # doctest: +SKIP
    """
    import anndata as ad

    if not isinstance(regions, bool):
        msg = f"`regions` must be True or False, got {regions!r}."
        raise TypeError(msg)
    folder = atlas_dir(path)
    counts_dir = folder / "counts"
    if not counts_dir.is_dir():
        msg = f"No atlas in {str(folder)!r}: it needs a folder 'counts' of '{{S}}.tsv.gz' files; check `path=`."
        raise FileNotFoundError(msg)
    found = sorted(f.name[: -len(".tsv.gz")] for f in counts_dir.glob("*.tsv.gz"))
    if not found:
        msg = f"No section in {str(counts_dir)!r}: expected files '{{S}}.tsv.gz' (spots x genes)."
        raise FileNotFoundError(msg)
    samples = choose_sections(samples, found, counts_dir)

    parts = [_read_section(folder, s) for s in tqdm(samples, desc="HER2ST atlas", disable=not settings.progress)]
    atlas = ad.concat(parts, join="outer", fill_value=0.0)
    if not atlas.var_names.is_monotonic_increasing:
        atlas = atlas[:, np.sort(atlas.var_names.to_numpy(dtype=str))].copy()
    for col in (Key.SAMPLE, PATIENT):
        atlas.obs[col] = pd.Categorical(atlas.obs[col], categories=list(dict.fromkeys(atlas.obs[col])))
    atlas.X = atlas.X.tocsr().astype(np.float32)
    if regions:
        atlas.obs[Key.REGION], missing = pathologist_column(folder, samples, atlas.obs_names)
        if len(missing) == len(samples):
            logger.warning(
                "No pathologist labels for sections %s in %s; `.obs['region']` is all missing.", samples, folder
            )
    atlas.uns[Key.UNS] = {
        Key.DATASET: {
            **{k: v for k, v in CITATION.items() if k != "genes"},
            "name": "HER2ST atlas",
            "path": str(folder.resolve()),
            "samples": samples,
        }
    }
    logger.info("HER2ST atlas: %d sections, %d spots, %d genes.", len(samples), atlas.n_obs, atlas.n_vars)
    return atlas
