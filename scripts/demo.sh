#!/usr/bin/env bash
# The demo: set up .venv if needed, then train/build/serve/query the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/influence-index ] || bash scripts/setup.sh
exec .venv/bin/influence-index demo "$@"
