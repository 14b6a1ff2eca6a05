"""The fitted scaler + PCA that reduces raw cell features to the features models read (``.obsm["X_bitro"]``).

Fitted by :func:`bitro.pp.extract_cells` (or on a fold's training cells by :func:`bitro.tl.cross_validate`); its
arrays are part of the extraction record and of a model's cell reference, so new slides are reduced the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bitro._logging import logger


def fit_reducer(raw: np.ndarray, n_components: int, *, seed: int = 0) -> dict[str, Any]:
    """Fit a standard scaler and a PCA of ``n_components`` (fewer when the data has fewer) on the raw features.

    Returns the fitted arrays (what an extraction record and a model's cell reference keep): ``scaler_mean``,
    ``scaler_scale``, ``pca_mean``, ``pca_components``, ``explained_variance_ratio``.
    """
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(raw)
    k = min(n_components, raw.shape[1], raw.shape[0])
    if k < n_components:
        logger.info(
            "PCA keeps %d components instead of n_components=%d (%d raw features, %d cells).",
            k,
            n_components,
            raw.shape[1],
            raw.shape[0],
        )
    pca = PCA(n_components=k, random_state=seed).fit(scaler.transform(raw))
    return {
        "scaler_mean": scaler.mean_.astype(np.float64),
        "scaler_scale": scaler.scale_.astype(np.float64),
        "pca_mean": pca.mean_.astype(np.float64),
        "pca_components": pca.components_.astype(np.float64),
        "explained_variance_ratio": pca.explained_variance_ratio_.astype(np.float64),
    }


def apply_reducer(raw: np.ndarray, reducer: Mapping[str, Any]) -> np.ndarray:
    """Raw features -> reduced features (float32) with a reducer of :func:`fit_reducer`."""
    z = (raw - np.asarray(reducer["scaler_mean"])) / np.asarray(reducer["scaler_scale"])
    return ((z - np.asarray(reducer["pca_mean"])) @ np.asarray(reducer["pca_components"]).T).astype(np.float32)
