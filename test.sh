#!/usr/bin/env bash
# Runs the test suite in the project's .venv (made on first use) and lists its 12 slowest tests.
# Extra arguments go to pytest, e.g. ./test.sh -k kernels -x
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
exec "$PY" -m pytest -q --durations=12 tests "$@"
