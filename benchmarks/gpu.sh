#!/usr/bin/env bash
# Run the GPU suite on one card from the working tree (no install needed):
#   bash benchmarks/gpu.sh            -> results/gpu-<card>-<date>/ (or $OUT when set, as on a lent machine)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu.py ${OUT:+--out "$OUT"} "$@"
