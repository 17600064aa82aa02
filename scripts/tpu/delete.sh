#!/usr/bin/env bash
# Delete the TPU VM or pod slice (it is billed while it exists).
source "$(dirname "$0")/common.sh"

gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --quiet
