#!/usr/bin/env bash
# Set up (first run) and run the whole test suite: unit and integration tests, then every
# notebook under nbmake. Extra arguments go to pytest, e.g. `bash scripts/test.sh -k capture`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"
# notebooks write their run folders here, not into the checkout
STEAMVIZ_RUNS="$(mktemp -d)"
export STEAMVIZ_RUNS
trap 'rm -rf "$STEAMVIZ_RUNS"' EXIT
python -m pytest -q -ra --durations=12 tests notebooks --nbmake --nbmake-timeout=1200 "$@"
