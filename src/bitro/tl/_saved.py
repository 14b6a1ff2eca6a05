"""A saved object as a folder of ``config.json`` (settings) and ``weights.safetensors`` (arrays), never pickle.

The format of the TPIR objects (:class:`~bitro.tl.ExpressionEncoder`, :class:`~bitro.tl.RegionClassifier`,
:class:`~bitro.tl.ImageAligner`): one writer and one reader, each object naming its ``format`` string, which is
stored in the config and checked on reading. (Models have their own, richer format: :mod:`bitro.tl._persist`.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"


def write_saved(path: Path, arrays: dict[str, np.ndarray], config: dict, fmt: str, saver: str) -> Path:
    """Write ``arrays`` (safetensors) and ``config`` (JSON) to the folder ``path``, aside and swapped in once complete.

    The counterpart of :func:`read_saved`; ``path`` may not be a file (``saver`` names the method in the error).
    """
    from safetensors.numpy import save_file

    from bitro._atomic import staged

    if path.is_file():
        msg = f"{str(path)!r} is a file; `{saver}` writes a folder: pass a folder path."
        raise FileExistsError(msg)
    with staged(path) as tmp:
        save_file(arrays, str(tmp / WEIGHTS_FILE), metadata={"format": fmt})
        (tmp / CONFIG_FILE).write_text(json.dumps({"format": fmt, **config}, indent=1))
    return path


def read_saved(folder: Path, what: str, fmt: str, saver: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The config (``format`` removed) and the arrays of a folder written by ``saver``; clear errors otherwise."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not folder.is_dir():
        msg = f"{str(folder)!r}: no folder there; pass the folder written by `{saver}`."
        raise FileNotFoundError(msg)
    files = (folder / CONFIG_FILE, folder / WEIGHTS_FILE)
    if not all(f.is_file() for f in files):
        msg = (
            f"{str(folder)!r} is not a saved {what}: it needs {CONFIG_FILE} and {WEIGHTS_FILE} (written by `{saver}`)."
        )
        raise FileNotFoundError(msg)
    try:
        config = json.loads(files[0].read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = f"{str(files[0])!r} is corrupted or truncated (not valid JSON: {e}); save the {what} again."
        raise ValueError(msg) from None
    if not isinstance(config, dict) or config.pop("format", None) != fmt:
        msg = f"{str(files[0])!r} is not the config of a bitro {what} (format {fmt!r})."
        raise ValueError(msg)
    try:
        arrays = load_file(str(files[1]))
    except (SafetensorError, OSError, ValueError) as e:
        msg = f"{str(files[1])!r} is corrupted or truncated ({e}); save the {what} again."
        raise ValueError(msg) from None
    return config, arrays
