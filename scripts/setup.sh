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
# tests/test_ui.py drives the web app in Chromium (Playwright's own browser download is not used): install the
# system's chromium where this machine allows it (apt, as root or with passwordless sudo); elsewhere those tests skip.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo -n"; fi
  if [ -z "$SUDO" ] || sudo -n true 2>/dev/null; then
    { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
      || echo "note: could not install chromium; the browser tests in tests/test_ui.py will be skipped" >&2
  fi
fi
