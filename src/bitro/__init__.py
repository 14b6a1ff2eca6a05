"""bitro: single-cell gene expression from H&E histology (BiTro) for the scverse.

``import bitro as bt`` loads no deep-learning library: torch, torch_geometric and peft are
imported by the functions of :mod:`bitro.tl` that need them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from bitro import datasets, io, pl, pp, tl
from bitro._constants import Key
from bitro._logging import logger
from bitro._pipeline import predict_slide
from bitro._settings import settings

try:
    __version__ = version("bitro")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["Key", "datasets", "io", "logger", "pl", "pp", "predict_slide", "settings", "tl", "__version__"]
