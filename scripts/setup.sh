#!/usr/bin/env bash
# Create .venv (once) and install bitro with its locked dependencies. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch==2.13.0 is pinned on purpose: it resolves to the CPU build; an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
  -c requirements/constraints.txt "torch==2.13.0" -e ".[test,doc,scvi]"
