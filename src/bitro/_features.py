"""What a cell feature means: the extraction settings and the fitted scaler + PCA, and their fingerprint.

:func:`bitro.pp.extract_cells` writes an *extraction record* to ``cells.uns["bitro"]["extract_cells"]``; a
model keeps the record of its training cells. Two cell tables have comparable features exactly when their
records have the same fingerprint: the same :data:`FEATURE_SETTINGS` and the same fitted scaler + PCA
(:data:`REDUCER_KEYS`). Which section the cells came from, or which shapes and image element they were read
from, does not change what a feature means and is not compared.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

#: Settings of an extraction record that define what a raw cell feature means.
FEATURE_SETTINGS: tuple[str, ...] = (
    "encoder",
    "weights_sha256",
    "crop_um",
    "crop_px",
    "add_morphology",
    "n_raw_features",
)
#: A patch table's token layout in its record (``bt.pp.spot_patches``): grid, level widths, token spacing, scales.
PATCH_LAYOUT = "patch_layout"
#: The arrays of the fitted standard scaler + PCA (``record["reducer"]``) that define what a reduced feature means.
REDUCER_KEYS: tuple[str, ...] = ("scaler_mean", "scaler_scale", "pca_mean", "pca_components")
#: How to make new cells comparable with a model's or a reference table's.
FIX = "Extract the new cells with `bt.pp.extract_cells(sdata, reference=model)` (or `reference=<training cell table>`)"


def plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays turned into Python scalars and lists (as JSON would hold them)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def file_digest(path: str | Path | None) -> str:
    """SHA-256 of a file's content (``""`` for no file): weights are compared by content, not by path."""
    if not path:
        return ""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _settings(record: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k in FEATURE_SETTINGS:
        v = plain(record.get(k))
        out[k] = round(float(v), 9) if k == "crop_um" and v is not None else v
    if record.get(PATCH_LAYOUT) is not None:  # a patch table's (cell tables have none: their fingerprints stay)
        out[PATCH_LAYOUT] = plain(record[PATCH_LAYOUT])
    return out


def reducer_digest(reducer: Mapping[str, Any] | None) -> str:
    """SHA-256 (16 hex digits) of the scaler + PCA arrays (float64 bytes), ``""`` without one."""
    if reducer is None:
        return ""
    h = hashlib.sha256()
    for k in REDUCER_KEYS:
        a = np.ascontiguousarray(np.asarray(reducer[k], dtype=np.float64))
        h.update(k.encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()[:16]


def fingerprint(record: Mapping[str, Any]) -> str:
    """The fingerprint (16 hex digits) of an extraction record: its feature settings and its scaler + PCA."""
    text = json.dumps([_settings(record), reducer_digest(record.get("reducer"))], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(
    trained: Mapping[str, Any], here: Mapping[str, Any], *, names: tuple[str, str] = ("the model", "these cells")
) -> str:
    """One line naming what makes two extraction records' features differ (``""`` when they agree).

    ``names`` say whose records they are, for the message.
    """
    a, b = _settings(trained), _settings(here)
    keys = (*FEATURE_SETTINGS, PATCH_LAYOUT)
    diffs = [f"{k} is {b.get(k)!r} for {names[1]} but {a.get(k)!r} for {names[0]}" for k in keys if a.get(k) != b.get(k)]
    if not diffs and reducer_digest(trained.get("reducer")) != reducer_digest(here.get("reducer")):
        diffs = [f"the scaler + PCA of {names[1]} was fitted on other cells than that of {names[0]}"]
    return "; ".join(diffs)


def record_of(cells: Any) -> dict[str, Any] | None:
    """The extraction record of a cell table (``.uns["bitro"]["extract_cells"]``), if any."""
    from bitro._constants import Key

    return cells.uns.get(Key.UNS, {}).get(Key.EXTRACT_CELLS)
