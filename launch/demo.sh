#!/usr/bin/env bash
# Train a paged table on NPROC CPU ranks (default 2) for a few steps; rank 0 prints what it did.
# Usage: bash launch/demo.sh [--rows N --dim D --page-size P --batch B --steps S --lr LR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="${NPROC:-2}" -m sharded_embedding.demo "$@"
