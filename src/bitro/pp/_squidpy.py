"""squidpy, imported without the warnings of its own docstrings."""

from __future__ import annotations

import sys
import warnings
from types import ModuleType


def import_squidpy() -> ModuleType:
    """Import squidpy (once), hiding the two ``SyntaxWarning`` messages its docstrings raise at import.

    docrep, which assembles squidpy's docstrings, warns "'n_jobs' is not a valid key!" and "'show_progress_bar'
    is not a valid key!" while squidpy is imported: shown by default, once per session, and only squidpy can fix
    them. Exactly these messages of that import are hidden; every other warning is shown.
    """
    with warnings.catch_warnings():
        if "squidpy" not in sys.modules:
            warnings.filterwarnings("ignore", r"'\w+' is not a valid key!", SyntaxWarning)
        import squidpy
        import squidpy.experimental.im  # noqa: F401  (bitro's stain steps use it)
    return squidpy
