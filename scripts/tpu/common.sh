# shellcheck shell=bash
# Settings shared by the TPU VM scripts; override any of them in the environment.
#   TPU_NAME          name of the TPU VM or pod slice            (default: mixtral)
#   ZONE              Cloud zone                                 (default: us-east5-a)
#   ACCELERATOR_TYPE  e.g. v5litepod-8, v5litepod-16, v5p-8, v4-32 (default: v5litepod-8)
#   RUNTIME_VERSION   TPU VM software version                    (default: v2-alpha-tpuv5-lite)
#   PROJECT           Cloud project (default: gcloud's configured project)
#   MODEL_DIR         where each worker keeps the model          (default: /mnt/disks/models/model)
# Every script prints its usage with -h or --help as its first argument, and does nothing else.
set -euo pipefail

# Print a file's leading comment block (after the #! or shellcheck line) without the comment marks.
print_leading_comment() {
  local line
  while IFS= read -r line; do
    case "$line" in
      '#!'* | '# shellcheck '*) ;;
      '#'*)
        line="${line#\#}"
        printf '%s\n' "${line# }"
        ;;
      *) return 0 ;;
    esac
  done <"$1"
}

# The scripts source this file with their arguments. Help is answered here, before any setting is read or
# any tool runs, so `--help` can never create, delete or copy anything. Only the first argument counts:
# later ones may be values (generate.sh --prompt -h).
case "${1:-}" in
  -h | --help)
    print_leading_comment "$0"
    echo
    print_leading_comment "${BASH_SOURCE[0]}"
    exit 0
    ;;
esac

# Refuse arguments in a script that takes none (its settings come from the environment), so that a
# mistyped flag is an error rather than silently ignored.
take_no_arguments() {
  if [[ $# -ne 0 ]]; then
    echo "$0: error: unexpected argument '$1' (settings come from the environment, see $0 --help)" >&2
    echo "usage: [SETTING=VALUE ...] $0" >&2
    exit 2
  fi
}

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

# Copy local files to the same path on every worker (a relative path is under the worker's home).
copy_to_workers() {
  local destination="$1"
  shift
  gcloud compute tpus tpu-vm scp "$@" "$TPU_NAME:$destination" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all
}
