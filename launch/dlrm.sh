#!/usr/bin/env bash
# Train the DLRM-style click model on a generated Criteo-shaped dataset: NPROC ranks (default 2)
# on this machine. Hydra overrides pass through (configs/dlrm.yaml); relative paths in them are
# relative to where you run this, e.g.:
#   bash launch/dlrm.sh train.steps=500 out_dir=/tmp/dlrm
#   bash launch/dlrm.sh data.scale=0.01 train.steps=100 train.batch_size=512     # a quick look
#   bash launch/dlrm.sh out_dir=/tmp/dlrm train.checkpoint_every=200 train.resume=true
# Exit code: 0, or the job's (2: configuration error, 1: other).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}
NPROC=${NPROC:-2}
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "NPROC must be a number of ranks >= 1, got '$NPROC'" >&2; exit 2; }
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package, wherever you run from
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m sharded_embedding.launch --standalone --nproc_per_node="$NPROC" -m sharded_embedding.dlrm "$@"
