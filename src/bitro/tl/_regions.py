"""Tissue-region recognition from H&E (TPIR's third stage): a linear classifier on spot image embeddings.

:func:`region_classifier` fits a multinomial logistic regression (``class_weight="balanced"``) on an image
embedding (:meth:`ImageAligner.embed`, or raw image features as the baseline) and the regions of the training
spots; :meth:`RegionClassifier.predict` labels the spots of any slide with a probability.
:func:`evaluate_regions` scores it leave-one-section-out (balanced accuracy, macro-F1, per class), optionally
re-training the image alignment inside every fold. :meth:`RegionClassifier.save` writes the fitted arrays
(safetensors) and the settings (JSON), no pickle; :func:`load_region_classifier` reads them back.

When the regions were transferred from expression (:meth:`ExpressionEncoder.transfer_labels`), they are a
silver standard, not a pathologist's ground truth.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bitro._checks import check_anndata, check_number
from bitro._constants import Key
from bitro._logging import logger

if TYPE_CHECKING:
    from anndata import AnnData

#: ``format`` of the saved config, checked when loading.
FORMAT = "bitro.region_classifier/1"
#: The fitted arrays of the pipeline, as saved: the scaler's, then the logistic regression's.
_ARRAYS = ("scaler_mean", "scaler_scale", "scaler_var", "coef", "intercept")


def _region_labels(adata: AnnData, labels_key: str) -> pd.Series:
    if labels_key not in adata.obs.columns:
        msg = f"`labels_key={labels_key!r}` is not a column of `adata.obs` (columns: {list(map(str, adata.obs.columns))})."
        raise KeyError(msg)
    return adata.obs[labels_key]


def _features(adata: AnnData, use_rep: str) -> np.ndarray:
    from bitro.tl._contrastive import _matrix

    return _matrix(adata, use_rep, "use_rep", "adata")


class RegionClassifier:
    """A region classifier on a spot embedding (returned by :func:`region_classifier`).

    Attributes
    ----------
    use_rep
        The ``.obsm`` key of the embedding it reads.
    pipeline
        The fitted scikit-learn pipeline (standardisation, logistic regression).
    """

    def __init__(self, pipeline: Any, use_rep: str, n_features: int) -> None:
        self.pipeline = pipeline
        self.use_rep = use_rep
        self.n_features = n_features

    @property
    def classes(self) -> list[str]:
        """The regions, in the order of the probability columns."""
        return [str(c) for c in self.pipeline.classes_]

    def __repr__(self) -> str:
        return f"RegionClassifier({len(self.classes)} regions on .obsm[{self.use_rep!r}]: {self.classes})"

    def predict(self, adata: AnnData, *, key_added: str | None = Key.REGION_PREDICTED) -> pd.DataFrame:
        """The region of every spot and its probability; spots of slides or patients never seen work the same.

        Parameters
        ----------
        adata
            Spots with the embedding in ``.obsm[use_rep]``.
        key_added
            Also write ``adata.obs[key_added]`` (categorical region) and ``adata.obs[f"{key_added}_probability"]``;
            None writes nothing.

        Returns
        -------
        Spots x (``"label"``, ``"probability"``, then one probability column per region).
        """
        check_anndata(adata, "`adata`", "pass the spot table with the embedding in .obsm")
        x = _features(adata, self.use_rep)
        if x.shape[1] != self.n_features:
            msg = f"`adata.obsm[{self.use_rep!r}]` has {x.shape[1]} features; the classifier was fitted on {self.n_features}."
            raise ValueError(msg)
        proba = pd.DataFrame(self.pipeline.predict_proba(x), index=adata.obs_names, columns=self.classes)
        label = pd.Categorical(proba.idxmax(axis=1), categories=self.classes)
        out = pd.concat(
            [pd.DataFrame({"label": label, "probability": proba.max(axis=1)}, index=adata.obs_names), proba], axis=1
        )
        if key_added is not None:
            adata.obs[key_added] = label
            adata.obs[f"{key_added}_probability"] = out["probability"].to_numpy()
        return out

    def save(self, path: str | Path) -> Path:
        """Write the classifier to the folder ``path``: ``config.json`` and ``weights.safetensors`` (no pickle).

        The fitted arrays (the standardisation's mean and scale, the logistic regression's coefficients and
        intercepts) go to the safetensors file, the regions and settings to the JSON config. The folder is written
        aside and swapped in once complete; read it back with :func:`load_region_classifier`.

        Parameters
        ----------
        path
            The folder; replaced when it exists.

        Returns
        -------
        The folder.
        """
        scaler, clf = self.pipeline[0], self.pipeline[-1]
        arrays = {
            "scaler_mean": scaler.mean_,
            "scaler_scale": scaler.scale_,
            "scaler_var": scaler.var_,
            "coef": clf.coef_,
            "intercept": clf.intercept_,
        }
        arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}  # their own dtypes: the same predictions
        config = {
            "use_rep": self.use_rep,
            "n_features": int(self.n_features),
            "classes": self.classes,
            "C": float(clf.C),
            "max_iter": int(clf.max_iter),
            "seed": None if clf.random_state is None else int(clf.random_state),
            "n_samples_seen": int(np.max(scaler.n_samples_seen_)),
        }
        from bitro.tl._saved import write_saved

        return write_saved(Path(path), arrays, config, FORMAT, "RegionClassifier.save")


def _fit(x: np.ndarray, y: np.ndarray, C: float, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = LogisticRegression(C=C, class_weight="balanced", max_iter=2000, random_state=seed)
    return make_pipeline(StandardScaler(), clf).fit(x, y)


def region_classifier(
    adata: AnnData,
    *,
    labels_key: str = Key.TRANSFERRED,
    use_rep: str = Key.IMAGE_EMBEDDING,
    C: float = 0.1,
    seed: int = 0,
) -> RegionClassifier:
    """Fit a region classifier on a spot embedding: standardisation and logistic regression, classes balanced.

    Parameters
    ----------
    adata
        Training spots with the regions in ``.obs[labels_key]`` (spots with a missing label are left out) and the
        embedding in ``.obsm[use_rep]``.
    labels_key
        The regions, e.g. transferred by :meth:`ExpressionEncoder.transfer_labels` (a silver standard) or a
        pathologist's.
    use_rep
        The embedding: :meth:`ImageAligner.embed`'s, or raw image features (:func:`spot_image_features`).
    C
        Inverse L2 penalty of the logistic regression.
    seed
        Random seed of the solver.

    Returns
    -------
    The classifier; :meth:`RegionClassifier.predict` labels spots.

    Examples
    --------
    >>> import bitro as bt
    >>> clf = bt.tl.region_classifier(spots, labels_key="region_transferred")  # doctest: +SKIP
    >>> clf.predict(new_spots)  # doctest: +SKIP
    """
    check_anndata(adata, "`adata`", "pass the training spots with their regions in .obs and the embedding in .obsm")
    labels = _region_labels(adata, labels_key)
    check_number("C", C, low=0, low_open=True)
    x = _features(adata, use_rep)
    keep = labels.notna().to_numpy()
    y = labels.astype(object).to_numpy()[keep].astype(str)
    if len(np.unique(y)) < 2:
        msg = f"`.obs[{labels_key!r}]` holds {len(np.unique(y))} region(s); a classifier needs at least 2."
        raise ValueError(msg)
    return RegionClassifier(_fit(x[keep], y, float(C), seed), use_rep, x.shape[1])


def load_region_classifier(path: str | Path) -> RegionClassifier:
    """Read a region classifier written by :meth:`RegionClassifier.save`.

    Parameters
    ----------
    path
        The folder with ``config.json`` and ``weights.safetensors``.

    Returns
    -------
    The classifier; it predicts exactly what the saved one did (same arrays, same scikit-learn pipeline).

    Examples
    --------
    >>> import bitro as bt
    >>> clf = bt.tl.load_region_classifier("region_classifier")  # doctest: +SKIP
    >>> clf.predict(new_spots)  # doctest: +SKIP
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from bitro.tl._saved import read_saved

    folder = Path(path)
    config, arrays = read_saved(folder, "region classifier", FORMAT, "RegionClassifier.save")
    try:
        classes = [str(c) for c in config["classes"]]
        n, use_rep = int(config["n_features"]), str(config["use_rep"])
        mean, scale, var, coef, intercept = (np.asarray(arrays[k]) for k in _ARRAYS)
    except (KeyError, TypeError, ValueError) as e:
        msg = f"{str(folder)!r} lacks part of a region classifier ({e!r} missing or wrong); save it again."
        raise ValueError(msg) from None
    rows = 1 if len(classes) == 2 else len(classes)
    if not (mean.shape == scale.shape == var.shape == (n,) and coef.shape == (rows, n) and intercept.shape == (rows,)):
        msg = (
            f"{str(folder)!r} holds arrays of the wrong shapes for {len(classes)} regions and {n} features "
            "(corrupted, or edited by hand); save the classifier again."
        )
        raise ValueError(msg)
    scaler = StandardScaler()
    scaler.mean_, scaler.scale_, scaler.var_ = mean, scale, var
    scaler.n_features_in_, scaler.n_samples_seen_ = n, int(config.get("n_samples_seen", 0))
    clf = LogisticRegression(
        C=float(config["C"]), class_weight="balanced", max_iter=int(config["max_iter"]), random_state=config["seed"]
    )
    clf.classes_ = np.asarray(classes, dtype=str)
    clf.coef_, clf.intercept_, clf.n_features_in_ = coef, intercept, n
    clf.n_iter_ = np.zeros(1, dtype=np.int32)
    return RegionClassifier(make_pipeline(scaler, clf), use_rep, n)


def region_scores(truth: Any, predicted: Any) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro-F1 (over the regions in the truth) of predicted regions, and the spots."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    truth, predicted = np.asarray(truth, dtype=str), np.asarray(predicted, dtype=str)
    labels = np.unique(truth)
    with warnings.catch_warnings():  # a region predicted but absent from the truth counts as an error, as intended
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = float(balanced_accuracy_score(truth, predicted))
    return {
        "n_spots": len(truth),
        "accuracy": float(accuracy_score(truth, predicted)),
        "balanced_accuracy": balanced,
        "macro_f1": float(f1_score(truth, predicted, labels=labels, average="macro", zero_division=0)),
    }


def evaluate_regions(
    adata: AnnData,
    *,
    labels_key: str = Key.TRANSFERRED,
    use_rep: str = Key.IMAGE_FEATURES,
    groups_key: str = Key.SAMPLE,
    align: dict[str, Any] | None = None,
    C: float = 0.1,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Leave-one-group-out accuracy of region classification (e.g. leave one section or patient out).

    For every group (``.obs[groups_key]``), the classifier of :func:`region_classifier` is fitted on the other
    groups' labelled spots and scored on the group's. With ``align``, the image alignment of
    :func:`bitro.tl.align_images` (those keyword arguments, reading ``.obsm[use_rep]`` as image features) is also
    trained on the other groups only, and the classifier reads its embedding. The majority class of the training
    spots is scored beside it (what a classifier that learned nothing gets).

    Parameters
    ----------
    adata
        Spots with regions, image features (and the expression embedding, with ``align``).
    labels_key
        The regions (spots with missing labels are left out of training and scoring).
    use_rep
        The image features (or any embedding).
    groups_key
        The ``.obs`` column of the folds.
    align
        Keyword arguments of :func:`bitro.tl.align_images`, or None to classify ``.obsm[use_rep]`` itself.
    C
        Inverse L2 penalty of the logistic regression.
    seed
        Random seed.

    Returns
    -------
    ``{"folds": ..., "per_class": ..., "predictions": ...}``: per held-out group and overall (row ``"all"``,
    pooled spots) ``n_spots``, ``accuracy``, ``balanced_accuracy``, ``macro_f1`` and ``majority_macro_f1``;
    precision, recall, F1 and support of each region over all folds; each scored spot's truth and prediction.
    """
    from sklearn.metrics import precision_recall_fscore_support

    from bitro.tl._contrastive import align_images

    check_anndata(adata, "`adata`", "pass the spots with regions in .obs and features in .obsm")
    labels = _region_labels(adata, labels_key)
    if groups_key not in adata.obs.columns:
        msg = f"`groups_key={groups_key!r}` is not a column of `adata.obs` (columns: {list(map(str, adata.obs.columns))})."
        raise KeyError(msg)
    check_number("C", C, low=0, low_open=True)
    if align is not None and not isinstance(align, dict):
        msg = f"`align` must be a dict of `bt.tl.align_images` keyword arguments or None, got {type(align).__name__}."
        raise TypeError(msg)
    x = _features(adata, use_rep)
    groups = adata.obs[groups_key].astype(str).to_numpy()
    keep = labels.notna().to_numpy()
    y = labels.astype(object).to_numpy().astype(str)
    names = list(dict.fromkeys(groups))
    if len(names) < 2:
        msg = f"`.obs[{groups_key!r}]` holds one group; leave-one-group-out needs at least 2."
        raise ValueError(msg)
    rows, preds = [], []
    for g in names:
        train, test = keep & (groups != g), keep & (groups == g)
        if not test.any():
            continue
        features = x
        if align is not None:
            aligner = align_images(adata[train], **{"image_rep": use_rep, "seed": seed, **align})
            features = aligner.embed(adata, key_added=None)
        model = _fit(features[train], y[train], float(C), seed)
        p = model.predict(features[test])
        values, counts = np.unique(y[train], return_counts=True)
        majority = np.full(test.sum(), values[np.argmax(counts)])
        rows.append(
            {
                "held_out": g,
                **region_scores(y[test], p),
                "majority_macro_f1": region_scores(y[test], majority)["macro_f1"],
            }
        )
        preds.append(pd.DataFrame({groups_key: g, "truth": y[test], "predicted": p}, index=adata.obs_names[test]))
        logger.info(
            "Regions, %s held out: balanced accuracy %.3f, macro-F1 %.3f.",
            g,
            rows[-1]["balanced_accuracy"],
            rows[-1]["macro_f1"],
        )
    predictions = pd.concat(preds)
    folds = pd.DataFrame(rows).set_index("held_out")
    overall = region_scores(predictions["truth"], predictions["predicted"])
    folds.loc["all"] = {**overall, "majority_macro_f1": np.nan}
    classes = sorted(set(predictions["truth"]) | set(predictions["predicted"]))
    prec, rec, f1, sup = precision_recall_fscore_support(
        predictions["truth"], predictions["predicted"], labels=classes, zero_division=0
    )
    per_class = pd.DataFrame(
        {"precision": prec, "recall": rec, "f1": f1, "support": sup}, index=pd.Index(classes, name="region")
    )
    return {"folds": folds, "per_class": per_class, "predictions": predictions}
