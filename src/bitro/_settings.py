"""Package-wide settings."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass
class Settings:
    """Global settings of bitro, available as ``bitro.settings``.

    Attributes
    ----------
    device
        Torch device used by ``bt.tl``: ``"auto"`` picks CUDA when present, else the CPU.
    n_jobs
        Number of local processes for tile work in ``bt.pp`` when no dask client is given.
    tile_size
        Edge of the square tiles (pixels) that image work is split into.
    progress
        Show tqdm progress bars.
    data_dir
        Folder with extra HER2ST sections; defaults to the environment variable
        ``BITRO_HER2ST_DIR``.
    cache_dir
        Folder where bitro keeps computed results to reuse them (e.g. the spot patches of
        :func:`bitro.pp.spot_patches`); defaults to the environment variable ``BITRO_CACHE_DIR``,
        else ``~/.cache/bitro``. Safe to delete: everything in it is recomputed when missing.
    """

    device: Literal["auto", "cpu", "cuda"] | str = "auto"
    n_jobs: int = 1
    tile_size: int = 2048
    progress: bool = True
    data_dir: Path | None = field(
        default_factory=lambda: Path(os.environ["BITRO_HER2ST_DIR"]) if os.environ.get("BITRO_HER2ST_DIR") else None
    )
    cache_dir: Path = field(default_factory=lambda: _default_cache_dir())


def _default_cache_dir() -> Path:
    """``$BITRO_CACHE_DIR``, else ``~/.cache/bitro``."""
    env = os.environ.get("BITRO_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bitro"


settings = Settings()
