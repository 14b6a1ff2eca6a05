"""A trained model's description (:class:`ModelConfig`): typed, validated, and written as the JSON ``config.json``.

torch-free: reading a config imports a model's network module only to validate its architecture.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from bitro._checks import ConfigError
from bitro._constants import Key
from bitro._deprecate import REMOVED_IN

#: Version of the saved model format this bitro writes and reads.
FORMAT_VERSION = 2
#: Levels a model predicts: spots (from the cells of each spot and its context) or bulk (all cells of a slide).
TARGETS: tuple[str, ...] = ("spot", "bulk")


@dataclass
class BagSettings:
    """How a model's bags are made from a cell table (:mod:`bitro.tl._bags`); lengths in micrometres.

    ``spot_radius``: the training spots' radius seen from their cells (virtual spots of new slides get it); ``None``
    for a bulk model.
    """

    context_radius: float = 150.0
    max_context: int = 64
    chunk_size: int = 256
    spot_radius: float | None = None


@dataclass
class ModelConfig:
    """What a trained model is: its kind, level, genes, target scaling, features, architecture and provenance.

    Attributes
    ----------
    model
        The registered model name (:mod:`bitro.tl.models`), e.g. ``"bitro"``.
    target
        ``"spot"`` or ``"bulk"``.
    scale
        Target scale, ``"cp10k"``, ``"log1p"`` or ``"hist2st"``.
    genes
        The genes predicted, in output order.
    zscore_mean, zscore_std
        Per gene: the training targets' mean and standard deviation (predictions are z-scores of these).
    feature_key
        The cell features' key in ``.obsm`` (``use_rep``).
    patch_key
        With patch tokens (``patch_key`` of :func:`bitro.tl.fit`): the spot table's ``.obsm`` key of the per-spot patch
        embedding the model reads beside the cells; ``None`` (not written) without.
    features
        The settings that define the cell features and their fingerprint (:func:`bitro.tl._bags.feature_config`).
    architecture
        The network's hyper-parameters (the model's architecture dataclass).
    bags
        How bags are made (:class:`BagSettings`).
    training
        The training arguments, as given.
    training_samples
        The samples trained on.
    members
        Per ensemble member: its seed and validation samples.
    transfer
        For a model made by :func:`bitro.tl.transfer`: the source level, base fingerprint, method, LoRA settings,
        genes carried / new / dropped and parameters trained; else ``None``.
    gene_scores
        Per-gene scores (column name -> one value per gene), shown in prediction tables' ``.var``; or ``None``.
    gene_scores_protocol
        How ``gene_scores`` were measured.
    stain_reference
        The stain reference the training images were normalised to (``bitro fit`` and the bundled models).
    training_data
        A description of the training data (bundled models).
    """

    target: str
    scale: str
    genes: list[str]
    zscore_mean: list[float]
    zscore_std: list[float]
    feature_key: str
    features: dict[str, Any]
    architecture: Any
    bags: BagSettings = field(default_factory=BagSettings)
    model: str = "bitro"
    training: dict[str, Any] = field(default_factory=dict)
    training_samples: list[str] = field(default_factory=list)
    members: list[dict[str, Any]] = field(default_factory=list)
    transfer: dict[str, Any] | None = None
    gene_scores: dict[str, list[float]] | None = None
    gene_scores_protocol: str | None = None
    stain_reference: dict[str, Any] | None = None
    training_data: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    patch_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able dict written to ``config.json`` (fields that are ``None`` left out)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["architecture"] = self.architecture.to_dict()
        out["bags"] = asdict(self.bags)
        return copy.deepcopy({k: v for k, v in out.items() if v is not None})

    @classmethod
    def from_dict(cls, config: Any, file: str | Path = "the model config") -> ModelConfig:
        """A validated config from a dict (a saved ``config.json``): types, allowed values, agreeing lengths.

        Raises :class:`ConfigError` naming the first problem. Fields a saved config must not have (other than
        those written beside it: ``n_members``, ``history``, ``cell_reference``, ``checksums``) are refused.
        """
        from bitro._checks import duplicates, is_int, is_number
        from bitro.tl._targets import SCALES
        from bitro.tl.models import get_model

        def fail(what: str) -> None:
            msg = (
                f"The model config {file} is invalid: {what}; it was not written by `BitroModel.save` or was edited. "
                "Save the model again."
            )
            raise ConfigError(msg)

        if not isinstance(config, dict):
            fail("it is not a JSON object")
        known = {f.name for f in fields(cls)}
        required = ["target", "scale", "genes", "zscore_mean", "zscore_std", "architecture", "bags", "features"]
        missing = [k for k in required if k not in config]
        if missing:
            fail(f"it lacks {missing}")
        unknown = sorted(set(config) - known)
        if unknown:
            fail(f"unknown fields {unknown}")
        c = copy.deepcopy(config)
        if c["target"] not in TARGETS:
            fail(f"target {c['target']!r} is not one of {TARGETS}")
        if c["scale"] not in SCALES:
            fail(f"scale {c['scale']!r} is not one of {SCALES}")
        genes = c["genes"]
        if not isinstance(genes, list) or not genes or not all(isinstance(g, str) and g for g in genes):
            fail("genes must be a non-empty list of gene names")
        if duplicates(genes):
            fail(f"genes {duplicates(genes)[:3]} occur more than once")
        for key in ("zscore_mean", "zscore_std"):
            v = c[key]
            if not isinstance(v, list) or len(v) != len(genes) or not all(is_number(x) and np.isfinite(x) for x in v):
                fail(f"{key} must be {len(genes)} finite numbers, one per gene")
        if not all(x > 0 for x in c["zscore_std"]):
            fail("zscore_std must be positive")
        try:
            spec = get_model(c.get("model", "bitro"))
        except ValueError as e:
            fail(str(e))
        arch = c["architecture"]
        if not isinstance(arch, dict):
            fail("architecture must be a dict")
        if spec.name == "bitro":  # saved before these fields existed: the values those models were trained with
            arch.setdefault("readout", "gene")
            arch.setdefault("cluster_weight", float((c.get("training") or {}).get("cluster_weight", 0.1)))
        try:
            c["architecture"] = spec.architecture.from_dict(arch)
        except (TypeError, ValueError) as e:
            fail(f"architecture: {e}")
        if c["architecture"].n_genes != len(genes):
            fail(f"architecture n_genes is {c['architecture'].n_genes} but {len(genes)} genes are listed")
        bags = c["bags"]
        if not isinstance(bags, dict) or set(bags) - {f.name for f in fields(BagSettings)}:
            fail(f"bags must be a dict of {[f.name for f in fields(BagSettings)]}")
        for key in ("context_radius", "spot_radius"):
            v = bags.get(key)
            if v is not None and not (is_number(v) and np.isfinite(v) and v >= 0):
                fail(f"bags {key} must be a number >= 0, got {v!r}")
        for key, low in (("max_context", 0), ("chunk_size", 1)):
            if key in bags and not (is_int(bags[key]) and bags[key] >= low):
                fail(f"bags {key} must be an integer >= {low}, got {bags[key]!r}")
        c["bags"] = BagSettings(**bags)
        features = c["features"]
        if not isinstance(features, dict) or not isinstance(features.get("fingerprint"), str):
            fail("features must be a dict with the features' fingerprint")
        if features.get("n_features", c["architecture"].n_features) != c["architecture"].n_features:
            fail(
                f"features n_features {features.get('n_features')} differs from the architecture's "
                f"{c['architecture'].n_features}"
            )
        if not isinstance(c.get("feature_key", ""), str):
            fail("feature_key must be a string")
        patch_dim = getattr(c["architecture"], "patch_dim", 0)
        if c.get("patch_key") is not None and not (isinstance(c["patch_key"], str) and c["patch_key"]):
            fail(f"patch_key must be a non-empty string, got {c['patch_key']!r}")
        radii = getattr(c["architecture"], "field_radii", ())
        if c.get("patch_key") and radii:
            fail(f"patch_key ({c['patch_key']!r}) and the architecture's field_radii ({list(radii)}) exclude each other")
        if bool(c.get("patch_key") or radii) != bool(patch_dim):
            fail(
                f"patch_key ({c.get('patch_key')!r}) or field_radii ({list(radii)}) and the architecture's patch_dim "
                f"({patch_dim}) must be set together"
            )
        scores = c.get("gene_scores")
        if scores is not None and (
            not isinstance(scores, dict) or not all(isinstance(v, list) and len(v) == len(genes) for v in scores.values())
        ):
            fail(f"gene_scores must map each score name to {len(genes)} values, one per gene")
        for key in ("training", "transfer", "stain_reference", "training_data"):
            if c.get(key) is not None and not isinstance(c[key], dict):
                fail(f"{key} must be a dict")
        for key in ("training_samples", "members"):
            if not isinstance(c.get(key, []), list):
                fail(f"{key} must be a list")
        if c.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            fail(f"format_version must be {FORMAT_VERSION}")
        c.setdefault("feature_key", Key.FEATURES)
        return cls(**c)

    # -- the dict access of bitro < 0.2, kept for one release -------------------------------------------------
    def _warn(self, key: str) -> None:
        warnings.warn(
            f"`model.config[{key!r}]` is deprecated: the config is a dataclass, use `model.config.{key}`; item access "
            f"stops working in bitro {REMOVED_IN}.",
            FutureWarning,
            stacklevel=3,
        )

    def __getitem__(self, key: str) -> Any:
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        self._warn(key)
        return self.to_dict().get(key)

    def get(self, key: str, default: Any = None) -> Any:
        """Deprecated dict access: ``getattr(config, key, default)``."""
        self._warn(key)
        value = self.to_dict().get(key) if key in {f.name for f in fields(self)} else None
        return default if value is None else value
