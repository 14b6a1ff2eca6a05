"""The package logger, a plain stdlib logger named ``bitro``."""

from __future__ import annotations

import logging

logger = logging.getLogger("bitro")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s bitro: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
