"""Write aside, swap in: how bitro replaces a folder or a file without ever losing what was there.

A new output is written to a hidden sibling ``.{name}.tmp-{pid}-{token}``; only once it is complete is the
old output renamed to ``.{name}.old-{pid}-{token}``, the new one renamed into place and the old one removed.
A process killed at any point leaves either the old output or the new one at ``path``:

- killed while writing: ``path`` is untouched; the temporary sibling is left behind;
- killed between the two renames: ``path`` is missing, the old output is whole in ``.old-``;
- killed while removing the old output: ``path`` is the new output.

:func:`recover` runs before every write to ``path`` and repairs all three: it puts a lone ``.old-`` back in
place and removes the leftovers of writers that are no longer running (the process id is in the name, so a
write in progress in another process is left alone).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bitro._logging import logger

#: ``.{name}.{tmp|old}-{pid}-{token}``; bitro < 0.3 wrote ``.{name}.{tmp|old}-{token}`` (no pid: taken as dead).
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{8}$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def leftovers(path: str | Path) -> list[Path]:
    """The temporary siblings of ``path`` left by interrupted writes (of any process)."""
    path = Path(path).absolute()
    if not path.parent.is_dir():
        return []
    out = []
    for p in path.parent.iterdir():
        m = _LEFTOVER.match(p.name)
        if m and m["name"] == path.name:
            out.append(p)
    return sorted(out)


def recover(path: str | Path) -> None:
    """Repair what a killed write to ``path`` left: restore a lone old output, remove dead writers' leftovers."""
    path = Path(path).absolute()
    dead = []
    for p in leftovers(path):
        m = _LEFTOVER.match(p.name)
        if m and (m["pid"] is None or not (_alive(int(m["pid"])) and int(m["pid"]) != os.getpid())):
            dead.append((m["kind"], p))
    olds = [p for kind, p in dead if kind == "old"]
    if olds and not (path.exists() or path.is_symlink()):
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        newest.rename(path)  # the swap was cut between its two renames: the previous output comes back
        logger.warning("Restored %s from %s, left by an interrupted write.", path, newest.name)
    for _, p in dead:
        if p.exists() or p.is_symlink():
            _remove(p)
            logger.info("Removed %s, left by an interrupted write.", p)


def sibling(path: Path, kind: str) -> Path:
    """A fresh hidden sibling of ``path`` for this process (``kind``: ``"tmp"`` or ``"old"``)."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def swap_in(tmp: Path, path: Path) -> None:
    """Put the complete ``tmp`` in place of ``path``; the old ``path`` is removed only once ``tmp`` is there."""
    if path.exists() or path.is_symlink():
        old = sibling(path, "old")
        path.rename(old)
        tmp.rename(path)
        _remove(old)
    else:
        tmp.rename(path)


@contextmanager
def staged(path: str | Path, *, folder: bool = True) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write into, swapped in place of ``path`` once the block completes.

    With ``folder`` the sibling is created as an empty folder; otherwise it does not exist yet (write a file
    there). An exception in the block removes the sibling and leaves ``path`` as it was.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = sibling(path, "tmp")
    if folder:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    swap_in(tmp, path)
