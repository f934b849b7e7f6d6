#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its dev tools.
# torch is pinned to 2.13.0, the CPU build; nothing here pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
