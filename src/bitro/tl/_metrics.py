"""Agreement between predicted and measured expression: the metrics of the evaluation protocol."""

from __future__ import annotations

import numpy as np


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(axis=1) / np.where(denom > 0, denom, 1.0), np.nan)


def pcc_overall(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean over observations (spots or bulk samples) of the Pearson correlation over genes.

    Observations whose truth or prediction is constant over genes are left out.
    """
    r = pcc_per_obs(pred, truth)
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


def pcc_per_obs(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Pearson correlation over genes of each observation (row); NaN where truth or prediction is constant."""
    return _pearson_rows(np.asarray(pred, float), np.asarray(truth, float))


def pcc_per_gene(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Pearson correlation over observations of each gene (column), with the rules of :func:`pcc_gene`.

    NaN where the truth has zero variance (undefined); 0 where the prediction is constant but the truth varies.
    """
    pred, truth = np.asarray(pred, float).T, np.asarray(truth, float).T
    r = np.full(truth.shape[0], np.nan)
    keep = truth.std(axis=1) > 0
    r[keep] = np.nan_to_num(_pearson_rows(pred[keep], truth[keep]), nan=0.0)
    return r


def pcc_gene(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean over genes of the Pearson correlation over observations.

    Genes with zero variance in the truth are excluded (their correlation is undefined); genes with a
    constant prediction but varying truth count as 0.
    """
    r = pcc_per_gene(pred, truth)
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


def js_divergence(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean over observations of the Jensen-Shannon divergence (base 2) of the profiles normalised to sum 1.

    Both inputs must be non-negative (e.g. counts, TPM or ``expm1`` of a log scale).
    """
    from scipy.special import rel_entr

    p, q = np.atleast_2d(np.asarray(pred, float)), np.atleast_2d(np.asarray(truth, float))
    if (p < 0).any() or (q < 0).any():
        msg = "js_divergence needs non-negative profiles; undo log scales (np.expm1) first."
        raise ValueError(msg)
    with np.errstate(invalid="ignore", divide="ignore"):  # an all-zero profile has no distribution: NaN, as before
        p, q = p / p.sum(axis=1, keepdims=True), q / q.sum(axis=1, keepdims=True)
        m = (p + q) / 2
        js = (rel_entr(p, m).sum(axis=1) + rel_entr(q, m).sum(axis=1)) / (2 * np.log(2))
    # rounding can leave a hair below 0 for (almost) equal profiles; scipy's square-root form turned that into NaN
    return float(np.mean(np.maximum(js, 0.0)))
