# shellcheck shell=bash
# Settings shared by the TPU VM scripts; override any of them in the environment.
#   TPU_NAME          name of the TPU VM or pod slice            (default: mixtral)
#   ZONE              Cloud zone                                 (default: us-east5-a)
#   ACCELERATOR_TYPE  e.g. v5litepod-8, v5litepod-16, v5p-8, v4-32 (default: v5litepod-8)
#   RUNTIME_VERSION   TPU VM software version                    (default: v2-alpha-tpuv5-lite)
#   PROJECT           Cloud project (default: gcloud's configured project)
#   MODEL_DIR         where each worker keeps the model          (default: /mnt/disks/models/model)
set -euo pipefail

TPU_NAME="${TPU_NAME:-mixtral}"
ZONE="${ZONE:-us-east5-a}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"
MODEL_DIR="${MODEL_DIR:-/mnt/disks/models/model}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then
  PROJECT_FLAG=(--project "$PROJECT")
fi

# Run a shell command on every worker of the slice at once (each worker runs the same command).
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command "$1"
}

# Copy local files to the same path on every worker.
copy_to_workers() {
  local destination="$1"
  shift
  gcloud compute tpus tpu-vm scp "$@" "$TPU_NAME:$destination" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all
}
