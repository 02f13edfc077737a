#!/usr/bin/env bash
# The main job on the embedded default (called by `make demo`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" tools/demo/smoke.py
