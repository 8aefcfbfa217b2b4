#!/usr/bin/env bash
# Train the DLRM-style click model on a generated Criteo-shaped dataset: NPROC ranks (default 2)
# on this machine. Hydra overrides pass through (configs/dlrm.yaml), e.g.:
#   bash launch/dlrm.sh train.steps=500 out_dir=/tmp/dlrm
#   bash launch/dlrm.sh data.scale=0.01 train.steps=100 train.batch_size=512     # a quick look
#   bash launch/dlrm.sh out_dir=/tmp/dlrm train.checkpoint_every=200 train.resume=true
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="${NPROC:-2}" -m sharded_embedding.dlrm "$@"
