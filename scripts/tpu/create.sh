#!/usr/bin/env bash
# Create a TPU VM or pod slice (settings: see --help or common.sh), e.g.
#   ACCELERATOR_TYPE=v5litepod-16 TPU_NAME=mixtral scripts/tpu/create.sh
source "$(dirname "$0")/common.sh" "$@"
take_no_arguments "$@"

gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
  --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION"
gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
  --format 'value(state,networkEndpoints.len())'
