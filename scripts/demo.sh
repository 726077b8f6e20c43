#!/usr/bin/env bash
# Set up (first run) and run the demo: edit 4 default facts with ROME and STEAM-ROME and
# write runs/demo/report.html (completions, layer cosine, latent map, logit lens) + PNGs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"
python -m steamviz demo --out "${1:-runs/demo}"
