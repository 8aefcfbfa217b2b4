#!/usr/bin/env bash
# Train skip-gram word vectors on sharded tables on this machine: NPROC ranks (default 2).
# Hydra overrides pass through; relative paths in them are relative to where you run this, e.g.:
#   bash launch/train.sh sharding=hot_mirrored optimizer=adagrad train.epochs=5 out_dir=/tmp/w2v
#   bash launch/train.sh -m optimizer=sgd,adagrad            # a sweep: the jobs run one after another
# Survive a lost rank: torchrun restarts the group and the job resumes from its last checkpoint:
#   MAX_RESTARTS=3 bash launch/train.sh out_dir=/data/run1 train.checkpoint_every=200 train.resume=true
# Exit code: 0, or the job's (2: configuration or data error, 3: training diverged, 1: other;
# 130 / 143: interrupted by SIGINT / SIGTERM, 128 + N: a worker killed by signal N).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}
NPROC=${NPROC:-2}
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "NPROC must be a number of ranks >= 1, got '$NPROC'" >&2; exit 2; }
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package, wherever you run from
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# After a restart (MAX_RESTARTS > 0), workers that share torchrun's rendezvous store can read
# the previous attempt's gloo addresses and fail to connect (pytorch/pytorch#135712): give each
# attempt its own store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
exec "$PY" -m sharded_embedding.launch --standalone --nproc_per_node="$NPROC" \
  --max-restarts="${MAX_RESTARTS:-0}" -m sharded_embedding.train "$@"
