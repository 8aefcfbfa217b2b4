#!/usr/bin/env bash
# Train skip-gram word vectors on sharded tables on this machine: NPROC ranks (default 2).
# Hydra overrides pass through, e.g.:
#   bash launch/train.sh sharding=hot_mirrored optimizer=adagrad train.epochs=5 out_dir=/tmp/w2v
# Survive a lost rank: torchrun restarts the group and the job resumes from its last checkpoint:
#   MAX_RESTARTS=3 bash launch/train.sh out_dir=/data/run1 train.checkpoint_every=200 train.resume=true
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# After a restart (MAX_RESTARTS > 0), workers that share torchrun's rendezvous store can read
# the previous attempt's gloo addresses and fail to connect (pytorch/pytorch#135712): give each
# attempt its own store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="${NPROC:-2}" \
  --max-restarts="${MAX_RESTARTS:-0}" -m sharded_embedding.train "$@"
