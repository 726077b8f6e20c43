#!/usr/bin/env bash
# Set up (first run) and run the whole test suite: unit and integration tests, then every
# notebook under nbmake. Extra arguments go to pytest, e.g. `bash scripts/test.sh -k capture`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"
# Public data: tests that need a data set run when it is in the cache or in the data mirror
# ($STEAMVIZ_DATA_MIRROR), and are skipped with the reason otherwise. CI's mirror is the
# shared/data folder beside the checkout.
if [ -z "${STEAMVIZ_DATA_MIRROR:-}" ] && [ -d "$ROOT/../shared/data" ]; then
  STEAMVIZ_DATA_MIRROR="$(cd "$ROOT/../shared/data" && pwd)"
  export STEAMVIZ_DATA_MIRROR
fi
echo "[steamviz] data mirror: ${STEAMVIZ_DATA_MIRROR:-none (data-dependent tests are skipped unless fetched)}"
# notebooks write their run folders here, not into the checkout
STEAMVIZ_RUNS="$(mktemp -d)"
export STEAMVIZ_RUNS
trap 'rm -rf "$STEAMVIZ_RUNS"' EXIT
python -m pytest -q -ra --durations=12 tests notebooks --nbmake --nbmake-timeout=1200 "$@"
