#!/usr/bin/env bash
# Run the test suite (unit tests on tiny random models + integration tests on the embedded
# model, marked `embedded`). Extra arguments go to pytest, e.g. `-m "not embedded"`.
# pytest exits non-zero (5) when no test ran, so this never passes vacuously.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest "$@"
