#!/usr/bin/env bash
# Train a paged table on NPROC CPU ranks (default 2) for a few steps; rank 0 prints what it did.
# Usage: bash launch/demo.sh [--rows N --dim D --page-size P --batch B --steps S --lr LR]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}
NPROC=${NPROC:-2}
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "NPROC must be a number of ranks >= 1, got '$NPROC'" >&2; exit 2; }
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m sharded_embedding.launch --standalone --nproc_per_node="$NPROC" -m sharded_embedding.demo "$@"
