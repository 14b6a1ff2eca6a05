"""Notebook reader of the docs build: the notebook as committed, less known import noise on stderr.

The rendered tutorials keep their stderr, where bitro logs what each step did (``INFO bitro: ...``) and the text
relies on it. Only lines matching :data:`NOISE` (warnings raised while other packages import, unrelated to the
tutorial) are dropped, with the source line a Python warning prints under them; a stream left empty is removed.
"""

from __future__ import annotations

import re

import nbformat

#: Lines of stderr that are noise: docrep's SyntaxWarning on invalid escape sequences when squidpy is imported.
NOISE = (re.compile(r"site-packages/docrep/.*SyntaxWarning"),)


def _clean(text: str) -> str:
    out, skip_source = [], False
    for line in text.splitlines(keepends=True):
        if any(p.search(line) for p in NOISE):
            skip_source = True  # a warning's next line is the source line it quotes, indented
            continue
        if skip_source and line.startswith("  "):
            skip_source = False
            continue
        skip_source = False
        out.append(line)
    return "".join(out)


def read(text: str) -> nbformat.NotebookNode:
    """Read a notebook (nbformat 4) and drop the noise lines of its stderr outputs."""
    nb = nbformat.reads(text, as_version=4)
    for cell in nb.cells:
        outputs = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                output["text"] = _clean(output["text"])
                if not output["text"]:
                    continue
            outputs.append(output)
        if "outputs" in cell:
            cell["outputs"] = outputs
    return nb
