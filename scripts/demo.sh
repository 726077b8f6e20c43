#!/usr/bin/env bash
# Set up (first run) and run the demo: load the default model, capture residual streams
# for a few prompts and write a small report under runs/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"
python -m steamviz demo --out "${1:-runs/demo}"
