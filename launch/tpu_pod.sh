#!/usr/bin/env bash
# Run launch/train.py on every host of a Cloud TPU VM pod slice.
#
# NOT RUN HERE: this project's machines have no TPU pod or gcloud credentials; the script is a
# documented template. Each TPU VM host runs one process; jax.distributed finds its peers through
# the TPU metadata (JAX_COORDINATOR_ADDRESS=auto -> cpmjax.train.distributed.initialize_distributed).
# The checkout must exist at the same path on every worker (e.g. cloned by a previous --command).
#
# Usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG [extra train.py flags...]
#   e.g. launch/tpu_pod.sh my-v5p-64 us-east5-a configs/minicpm4_0p5b.py --workdir=gs://bucket/run1
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,12p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; shift 3
REPO=${CPMJAX_REPO:-~/cpmjax}
EXTRA=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd $REPO && JAX_COORDINATOR_ADDRESS=auto python launch/train.py --config=$CONFIG $EXTRA"
