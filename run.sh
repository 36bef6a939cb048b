#!/usr/bin/env bash
# llmopt workbook: one script, two commands.
#   ./run.sh lab    set up .venv and open the workbook in JupyterLab
#   ./run.sh test   set up .venv and run every test: unit tests and all notebooks under nbval
#   ./run.sh setup  only set up .venv
# Environment: PYTHON (default python3, >= 3.10), LLMOPT_VENV (default .venv),
#   LLMOPT_CI (tests default to 1 = CI sizes; LLMOPT_CI=0 runs notebooks at full size),
#   TORCH_INDEX (a pip index for torch, e.g. https://download.pytorch.org/whl/cpu).
set -euo pipefail
cd "$(dirname "$0")"
cmd=${1:-lab}
shift || true
VENV=${LLMOPT_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
  "$PY" -c 'import sys; assert sys.version_info >= (3, 10), "llmopt needs Python >= 3.10"'
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  if ! python -c "import torch" 2>/dev/null; then
    idx=()
    [ -n "${TORCH_INDEX:-}" ] && idx=(--index-url "$TORCH_INDEX")
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      echo "== GPU found: installing a CUDA build of torch"
      python -m pip install "${idx[@]}" "torch>=2.4,<2.15"
    else
      # a bare `torch` on a CPU-only machine would pull a multi-GB CUDA build
      echo "== no GPU: installing the CPU build torch==2.13.0 first"
      python -m pip install "${idx[@]}" torch==2.13.0
    fi
  fi
  python -m pip install -q -r requirements.txt
  python -m pip install -q --no-deps -e .
}

case "$cmd" in
  setup) setup ;;
  lab)
    setup
    root=()
    [ "$(id -u)" = 0 ] && root=(--allow-root)   # containers often run as root
    exec jupyter lab "${root[@]}" notebooks/ "$@" ;;
  test)
    setup
    export LLMOPT_CI=${LLMOPT_CI:-1}
    exec python -m pytest "$@" ;;
  *) echo "usage: ./run.sh [lab|test|setup] [extra args]" >&2; exit 2 ;;
esac
