"""The predictors bitro can train, by name: ``bt.tl.fit(data, model=name)``.

Each entry names a network class (``"module:Class"``, imported only when used, so ``import bitro`` stays free of
torch) derived from :class:`bitro.tl.models._base.CellBagNetwork`; its ``architecture_class`` is the dataclass
of its hyper-parameters. :func:`bitro.tl.fit`, :func:`bitro.tl.predict`, saving and :func:`bitro.tl.load_model`
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
    """A registered model: its name, its network class (``"module:Class"``) and a one-line description."""

    name: str
    network_path: str
    description: str = ""

    @property
    def network(self) -> Any:
        """The network class (imports its module, and torch, on first use)."""
        module, _, cls = self.network_path.partition(":")
        return getattr(importlib.import_module(module), cls)

    @property
    def architecture(self) -> Any:
        """The dataclass of the network's hyper-parameters."""
        return self.network.architecture_class


MODELS: dict[str, ModelSpec] = {}


def register(name: str, network: str | type, description: str = "") -> ModelSpec:
    """Make a model trainable by name: ``network`` is its class or its ``"module:Class"`` path.

    Registering a name again replaces the entry.

    Examples
    --------
    >>> from bitro.tl.models import register
    >>> register("mine", "my_package.my_module:MyNet", "my network")  # doctest: +SKIP
    """
    if not isinstance(name, str) or not name.isidentifier():
        msg = f"A model name must be a simple lowercase identifier such as 'bitro', got {name!r}."
        raise ValueError(msg)
    path = network if isinstance(network, str) else f"{network.__module__}:{network.__qualname__}"
    if ":" not in path:
        msg = f"Give the network as a class or as 'module:Class', got {network!r}."
        raise ValueError(msg)
    MODELS[name] = ModelSpec(name, path, description)
    return MODELS[name]


def get_model(name: Any) -> ModelSpec:
    """The registered model ``name``, or an error listing the registered names."""
    if not isinstance(name, str) or name not in MODELS:
        msg = f"model={name!r} is not a registered model; use one of {sorted(MODELS)}."
        raise ValueError(msg)
    return MODELS[name]


def model_name(network: Any) -> str:
    """The registered name of a network's class (raises for an unregistered one)."""
    path = f"{type(network).__module__}:{type(network).__qualname__}"
    for spec in MODELS.values():
        if spec.network_path == path:
            return spec.name
    msg = f"The network class {path} is not registered; register it with `bitro.tl.models.register`."
    raise ValueError(msg)


register(
    "bitro",
    "bitro.tl.models._bitro:BitroNet",
    "BiTro: GAT + Transformer over cell bags, gene-query attention pooling, per-cell readout",
)
