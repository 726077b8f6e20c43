#!/usr/bin/env bash
# Regenerate the figure gallery of docs/figures.md with one command:
#   bash scripts/gallery.sh
# 1. When docs/gallery/run holds no points, a tiny sweep fills it (docs/gallery/sweep.yaml: 4
#    edits, ROME vs STEAM-ROME at lambda 10 and 50, the notebooks' FAST hyperparameters; a few
#    minutes on a 2-core CPU). The run is committed, so this step normally does nothing.
# 2. `steamviz figures` draws every figure of the run into docs/gallery/*.png at the
#    two-column paper size; --replay re-applies the run's edits to draw the latent map and
#    the logit lens too (about a minute on a CPU).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"
RUN=docs/gallery/run
if ! compgen -G "$RUN/points/*.json" >/dev/null; then
  python -m steamviz sweep docs/gallery/sweep.yaml --out "$RUN"
fi
python -m steamviz figures "$RUN" --replay --formats png --scale 1.5 --out docs/gallery
rm -f "$RUN/.lock"  # the sweep's writer lock: nothing to commit
du -ch "$RUN" docs/gallery/*.png | tail -1 | sed 's/total/gallery size (run + PNGs)/'
