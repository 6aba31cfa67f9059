#!/usr/bin/env bash
# Creates .venv and installs genadapt with its test tools. Safe to rerun: it skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
# Install a CPU torch first when none is present, so the dependency resolver does not pull a
# multi-GB CUDA build. GPU users: install the torch you want into .venv before running this.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
if ! .venv/bin/python -c "import genadapt, pytest" 2>/dev/null || [ pyproject.toml -nt .venv/.genadapt-installed ]; then
  .venv/bin/python -m pip install --quiet -e ".[test]"
  touch .venv/.genadapt-installed
fi
