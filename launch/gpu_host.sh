#!/usr/bin/env bash
# Train on one multi-GPU host: a single process drives every local GPU (jax sees them all as one
# mesh), so no jax.distributed set-up is needed; the mesh comes from --config.mesh.*.
#
# NOT RUN HERE as a multi-GPU job: the lent machines have one GPU. For several hosts, start one
# process per host with JAX_COORDINATOR_ADDRESS=host0:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i
# (read by cpmjax.train.distributed.initialize_distributed).
#
# Usage: launch/gpu_host.sh CONFIG [extra train.py flags...]
#   e.g. launch/gpu_host.sh configs/minicpm4_0p5b.py --config.mesh.fsdp=-1 --config.train.compute_dtype=bfloat16
set -euo pipefail
if [[ $# -lt 1 ]]; then
  sed -n '2,10p' "$0"; exit 2
fi
CONFIG=$1; shift
cd "$(dirname "$0")/.."
# Let XLA use most of GPU memory up front (avoids fragmentation), keep the rest for NCCL/cuDNN.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python launch/train.py --config="$CONFIG" "$@"
