#!/usr/bin/env bash
# Train skip-gram word vectors on sharded tables on this machine: NPROC ranks (default 2).
# Hydra overrides pass through, e.g.:
#   bash launch/train.sh sharding=hot_mirrored optimizer=adagrad train.epochs=5 out_dir=/tmp/w2v
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="${NPROC:-2}" -m sharded_embedding.train "$@"
