#!/usr/bin/env bash
# Train on several machines: run this once on every node, with the same MASTER_ADDR/MASTER_PORT.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0.example MASTER_PORT=29500 NPROC=8 bash launch/multinode.sh [overrides]
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0.example MASTER_PORT=29500 NPROC=8 bash launch/multinode.sh [overrides]
# The nodes meet through torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT. The corpus path
# and out_dir must be on a filesystem every node sees (each rank writes its part of the vectors).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
: "${NNODES:?set NNODES, the number of machines}"
: "${NODE_RANK:?set NODE_RANK, the index of this machine, 0..NNODES-1}"
: "${MASTER_ADDR:?set MASTER_ADDR, the host that runs the rendezvous}"
PY=${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}
NPROC=${NPROC:-2}
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "NPROC must be a number of ranks >= 1, got '$NPROC'" >&2; exit 2; }
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# After a restart (MAX_RESTARTS > 0), workers that share torchrun's rendezvous store can read
# the previous attempt's gloo addresses and fail to connect (pytorch/pytorch#135712): give each
# attempt its own store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
exec "$PY" -m sharded_embedding.launch \
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" --max-restarts="${MAX_RESTARTS:-0}" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id="${RDZV_ID:-sharded-embedding}" \
  -m sharded_embedding.train "$@"
