#!/usr/bin/env bash
# Delete the TPU VM or pod slice (it is billed while it exists), without asking for confirmation.
source "$(dirname "$0")/common.sh" "$@"
take_no_arguments "$@"

# gcloud is told not to ask, so say what goes before it goes.
echo "deleting TPU VM '$TPU_NAME' in zone $ZONE${PROJECT:+ of project $PROJECT}" >&2
gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --quiet
