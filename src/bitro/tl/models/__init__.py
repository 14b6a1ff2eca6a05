"""The predictors bitro can train, by name: ``bt.tl.fit(data, model=name)``.

Each entry names a network class (or its ``"module:Class"`` path, imported only when used, so ``import bitro`` stays
free of torch) derived from :class:`CellBagNetwork`; its ``architecture_class`` is the dataclass of its
hyper-parameters, derived from :class:`Architecture`. Both, and the :class:`Batch` a network reads, are importable
from here (``from bitro.tl.models import Architecture, CellBagNetwork, register``). :func:`bitro.tl.fit`, :func:`bitro.tl.predict`, saving and :func:`bitro.tl.load_model`
find a model here by the name stored in its config. Adding a model is its own module and one
:func:`register` line below (see ``docs/contributing.md``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

#: The model :func:`bitro.tl.fit` trains unless told otherwise.
DEFAULT_MODEL = "bitro"


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its name, its network class (or ``"module:Class"``) and a one-line description."""

    name: str
    network_ref: str | type
    description: str = ""

    @property
    def network(self) -> Any:
        """The network class (a ``"module:Class"`` path is imported, with torch, on first use)."""
        if not isinstance(self.network_ref, str):
            return self.network_ref
        module, _, cls = self.network_ref.partition(":")
        return getattr(importlib.import_module(module), cls)

    @property
    def architecture(self) -> Any:
        """The dataclass of the network's hyper-parameters."""
        return self.network.architecture_class

    @property
    def reads_patches(self) -> bool:
        """Whether the model reads the patch table of ``bt.pp.spot_patches`` (and predicts spots) instead of cells."""
        return self.architecture.input_table == "patches"


MODELS: dict[str, ModelSpec] = {}

#: What a model's own module builds on, loaded (with torch) on first access: ``from bitro.tl.models import ...``.
_BASE = {
    "Architecture": "bitro.tl.models._base",
    "CellBagNetwork": "bitro.tl.models._base",
    "Batch": "bitro.tl._bags",
    "M2ORTArchitecture": "bitro.tl.models._m2ort",
    "M2ORTNet": "bitro.tl.models._m2ort",
    "CMRCNetArchitecture": "bitro.tl.models._cmrcnet",
    "CMRCNet": "bitro.tl.models._cmrcnet",
}


def __getattr__(name: str) -> Any:
    if name in _BASE:
        return getattr(importlib.import_module(_BASE[name]), name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def register(name: str, network: str | type, description: str = "") -> ModelSpec:
    """Make a model trainable by name: ``network`` is its class or its ``"module:Class"`` path.

    Registering a name again replaces the entry.

    Examples
    --------
    >>> from bitro.tl.models import register
    >>> register("mine", "my_package.my_module:MyNet", "my network")  # doctest: +SKIP
    >>> register("toy", ToyNet)  # doctest: +SKIP
    """
    if not isinstance(name, str) or not name.isidentifier():
        msg = f"A model name must be a simple identifier such as 'bitro', got {name!r}."
        raise ValueError(msg)
    if isinstance(network, str) and ":" not in network:
        msg = f"Give the network as a class or as 'module:Class', got {network!r}."
        raise ValueError(msg)
    if not isinstance(network, str) and not hasattr(network, "architecture_class"):
        msg = f"{network!r} is not a network class: derive it from bitro.tl.models.CellBagNetwork."
        raise TypeError(msg)
    MODELS[name] = ModelSpec(name, network, description)
    return MODELS[name]


def get_model(name: Any) -> ModelSpec:
    """The registered model ``name``, or an error listing the registered names."""
    if not isinstance(name, str) or name not in MODELS:
        msg = f"model={name!r} is not a registered model; use one of {sorted(MODELS)}."
        raise ValueError(msg)
    return MODELS[name]


register(
    "bitro",
    "bitro.tl.models._bitro:BitroNet",
    "BiTro: GAT + Transformer over cell bags, gene-query attention pooling, per-cell readout",
)
register(
    "m2ort",
    "bitro.tl.models._m2ort:M2ORTNet",
    "M2ORT (Wang et al. 2024): multi-scale spot patches, cross-level attention, cls-token regression",
)
register(
    "cmrcnet",
    "bitro.tl.models._cmrcnet:CMRCNet",
    "CMRCNet (Liu et al. 2025): contrastive image-expression alignment, masked reconstruction, top-k retrieval",
)
