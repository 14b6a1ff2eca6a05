"""The validation layer at the door of bitro's public functions: one sentence per bad input, before any work.

Every check raises with a message that names the argument or table, says what was wrong and how to fix it.
None of them modifies what it checks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd


class TrainingDivergedError(RuntimeError):
    """Training stopped because its loss or predictions exploded; nothing was returned or written."""


class ConfigError(ValueError):
    """A saved model config that is not valid (edited, truncated or not written by bitro)."""


class StainFitError(ValueError):
    """No haematoxylin and eosin stain vectors could be fitted on an image (no or too little stained tissue)."""


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or numpy; ``bool`` is not)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number (Python or numpy; ``bool`` is not)."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


def check_int(name: str, value: Any, *, minimum: int | None = None) -> None:
    """Raise unless ``value`` is an integer of at least ``minimum``."""
    if not is_int(value):
        msg = f"`{name}` must be an integer, got {value!r} ({type(value).__name__}); pass a whole number."
        raise TypeError(msg)
    if minimum is not None and value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        msg = f"`{name}` must be {what}, got {value!r}."
        raise ValueError(msg)


def check_bool(name: str, value: Any, *, allow_none: bool = False) -> None:
    """Raise unless ``value`` is ``True`` or ``False`` (or ``None`` when allowed)."""
    if not (isinstance(value, bool | np.bool_) or (allow_none and value is None)):
        msg = f"`{name}` must be True or False{' or None' if allow_none else ''}, got {value!r}."
        raise TypeError(msg)


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> None:
    """Raise unless ``value`` is a finite real number within ``[low, high]`` (open ends with ``*_open``)."""
    if not is_number(value):
        msg = f"`{name}` must be a number, got {value!r} ({type(value).__name__})."
        raise TypeError(msg)
    v = float(value)
    bad = not math.isfinite(v)
    bad |= low is not None and (v <= low if low_open else v < low)
    bad |= high is not None and (v >= high if high_open else v > high)
    if bad:
        lo = "" if low is None else f"{'(' if low_open else '['}{low:g}"
        hi = "" if high is None else f"{high:g}{')' if high_open else ']'}"
        where = f"in {lo or '(-inf'}, {hi or 'inf)'}" if lo or hi else "finite"
        msg = f"`{name}` must be a finite number {where}, got {value!r}.{(' ' + hint) if hint else ''}"
        raise ValueError(msg)


def check_names(name: str, values: Any, *, allow_empty: bool = False) -> list[str]:
    """A list of distinct non-empty names (genes, samples) from a list-like ``values``; a bare string is refused."""
    if isinstance(values, str | bytes):
        msg = f"`{name}` must be a list of names, got the string {values!r}; wrap it in a list: [{values!r}]."
        raise TypeError(msg)
    if not isinstance(values, Iterable) or isinstance(values, dict):
        msg = f"`{name}` must be a list of names, got {type(values).__name__}."
        raise TypeError(msg)
    out = [str(v) for v in values]
    if not out and not allow_empty:
        msg = f"`{name}` is empty; give at least one name (or leave it out for the default)."
        raise ValueError(msg)
    blank = [v for v in out if not v.strip()]
    if blank:
        msg = f"`{name}` contains empty names; give each name as a non-empty string."
        raise ValueError(msg)
    dup = duplicates(out)
    if dup:
        msg = f"`{name}` names {dup[:5]} more than once; give each name once."
        raise ValueError(msg)
    return out


def duplicates(values: Sequence[Any] | pd.Index | np.ndarray) -> list[str]:
    """The values that occur more than once, as strings, in order of first occurrence."""
    s = pd.Series(np.asarray(values, dtype=object)).astype(str)
    return list(pd.unique(s[s.duplicated()]))


def check_unique_index(index: pd.Index, what: str, fix: str) -> None:
    """Raise when ``index`` (the ``obs_names`` / ``var_names`` of a table) has duplicates."""
    dup = duplicates(index)
    if dup:
        msg = f"{what} has duplicated names {dup[:5]}; {fix}."
        raise ValueError(msg)


def check_finite_array(x: Any, what: str, fix: str) -> np.ndarray:
    """``x`` as a float64 array, refused when it holds NaN or infinite values."""
    a = np.asarray(x, dtype=np.float64)
    bad = ~np.isfinite(a)
    if bad.any():
        rows = int(bad.reshape(len(a), -1).any(axis=1).sum()) if a.ndim else 1
        msg = f"{what} holds NaN or infinite values ({rows} rows); {fix}."
        raise ValueError(msg)
    return a


def check_anndata(value: Any, what: str, fix: str) -> None:
    """Raise a :class:`TypeError` unless ``value`` is an AnnData."""
    from anndata import AnnData

    if not isinstance(value, AnnData):
        msg = f"{what} must be an AnnData, got {type(value).__name__}; {fix}."
        raise TypeError(msg)


def check_rgb_image(level: Any, image_key: str, needed_for: str) -> None:
    """Refuse an image level that is not 8-bit RGB (``(c, y, x)`` with 3 channels of uint8), naming ``needed_for``."""
    if level.sizes.get("c") != 3 or level.dtype != np.uint8:
        msg = (
            f"Image {image_key!r} has {level.sizes.get('c')} channels of {level.dtype}; {needed_for} needs an 8-bit RGB "
            "H&E image (uint8 RGB, 3 channels): drop an alpha channel, convert grayscale to RGB, or rescale 16-bit / "
            "float pixels to 0-255."
        )
        raise ValueError(msg)
