#!/usr/bin/env bash
# Set up (first run) and run the whole test suite, notebooks included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k capture`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"
python -m pytest -q -ra "$@"
