"""Old names of renamed arguments and functions, kept working for one release with a :class:`FutureWarning`.

bitro follows scanpy/squidpy names (``data``, ``seed``, US spelling, ...); an argument or function renamed to fit
them keeps its old name until :data:`REMOVED_IN`, so existing notebooks run and say what to change.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

#: The release that drops the old names.
REMOVED_IN = "0.3"

F = TypeVar("F", bound=Callable[..., Any])


def renamed_args(**old_to_new: str) -> Callable[[F], F]:
    """Accept the old keyword names ``old_to_new`` of a function's arguments, warning once per call.

    Examples
    --------
    >>> @renamed_args(sdata="data")
    ... def f(data): ...
    """

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    msg = f"{func.__qualname__}() got both `{old}` and `{new}`; `{old}` is the old name of `{new}`, pass only `{new}`."
                    raise TypeError(msg)
                warnings.warn(
                    f"{func.__qualname__}(): `{old}` is renamed `{new}`; the old name stops working in bitro {REMOVED_IN}.",
                    FutureWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        wrapper.__renamed_args__ = dict(old_to_new)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def renamed_function(func: F, old_name: str) -> F:
    """``func`` under its old name ``old_name``: the same call, with a :class:`FutureWarning`."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        warnings.warn(
            f"`{old_name}` is renamed `{func.__name__}`; the old name stops working in bitro {REMOVED_IN}.",
            FutureWarning,
            stacklevel=2,
        )
        return func(*args, **kwargs)

    wrapper.__name__ = wrapper.__qualname__ = old_name
    wrapper.__doc__ = f"Deprecated alias of ``{func.__name__}`` (until bitro {REMOVED_IN})."
    return wrapper  # type: ignore[return-value]
