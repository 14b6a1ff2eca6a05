from __future__ import annotations

import logging
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]
SHARED_HER2ST = REPO.parent / "shared" / "data" / "her2st"


@pytest.fixture(scope="session")
def her2st_dir() -> Path:
    """Folder with the real HER2ST sections: the shared copy beside the repository, else the bundled one."""
    if SHARED_HER2ST.is_dir():
        return SHARED_HER2ST
    from bitro.datasets._her2st import BUNDLED_DIR

    return BUNDLED_DIR


@pytest.fixture(autouse=True)
def _quiet_progress():
    """No progress bars in test output; restore settings afterwards."""
    import bitro

    old = bitro.settings.progress
    bitro.settings.progress = False
    yield
    bitro.settings.progress = old


@pytest.fixture
def caplog_bitro(caplog):
    """caplog that also sees the non-propagating ``bitro`` logger."""
    logger = logging.getLogger("bitro")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)
