#!/usr/bin/env bash
# Regenerate requirements-lock.txt: the exact version of every dependency of steamviz (with
# its dev and ray extras) for the CPU install path -- Python 3.11, Linux x86_64, beside the
# CPU build of torch==2.13.0, which scripts/_env.sh installs with it and the lock leaves out
# (GPU users bring their own torch). Compiled from pyproject.toml by uv.
#
#   bash scripts/lock.sh             # after changing a dependency in pyproject.toml
#
# TORCH_CPU_WHEELS: a folder (or index page) holding torch-2.13.0+cpu's wheel, so that its
# dependencies, not the CUDA build's, are resolved (default /opt/wheels).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
UV="$(command -v uv || true)"
if [ -z "$UV" ]; then
  tools="$(mktemp -d)"
  trap 'rm -rf "$tools"' EXIT
  python3 -m pip install -q --target "$tools" "uv==0.13.9"
  UV="$tools/bin/uv"
fi
override="$(mktemp)"
echo "torch==2.13.0+cpu" > "$override"
"$UV" pip compile pyproject.toml --extra dev --extra ray --python-version 3.11 \
  --find-links "${TORCH_CPU_WHEELS:-/opt/wheels}" --override "$override" \
  --no-emit-package torch --no-emit-find-links \
  --custom-compile-command "bash scripts/lock.sh" -o requirements-lock.txt
rm -f "$override"
echo "wrote requirements-lock.txt ($(grep -c '==' requirements-lock.txt) pinned packages)"
