#!/usr/bin/env bash
# Put a checkpoint on every worker at $MODEL_DIR (each host reads only its own shards, but from local files).
#   scripts/tpu/checkpoint.sh gs://BUCKET/PATH         copy a model folder or checkpoint from Cloud Storage
#   scripts/tpu/checkpoint.sh hf:mistralai/Mixtral-8x7B-v0.1  download from the Hugging Face Hub and convert
# A Hub download needs HF_TOKEN in the environment for gated repositories; it reaches the workers as a
# file readable only by the user, never on a command line.
source "$(dirname "$0")/common.sh" "$@"

if [[ $# -ne 1 ]]; then
  echo "usage: $0 gs://BUCKET/PATH | hf:REPO_ID" >&2
  exit 2
fi
SOURCE="$1"
PARENT="$(dirname "$MODEL_DIR")"

case "$SOURCE" in
  gs://*)
    on_all_workers "mkdir -p '$PARENT' && gcloud storage cp --recursive '${SOURCE%/}' '$PARENT/' && \
      mv '$PARENT/$(basename "${SOURCE%/}")' '$MODEL_DIR'"
    ;;
  hf:*)
    REPO="${SOURCE#hf:}"
    # The token must never be in a command line: the remote one is in every worker's process list, and
    # both are in gcloud's argv here. It travels as a file readable only by the user; the remote shell
    # reads it into the environment with an assignment (no argv) and deletes it before anything else runs.
    READ_TOKEN=""
    if [[ -n "${HF_TOKEN:-}" ]]; then
      REMOTE_TOKEN=".mixtral-jax-hf-token"
      TOKEN_FILE="$(umask 077 && mktemp)"
      trap 'rm -f "$TOKEN_FILE"' EXIT
      printf '%s' "$HF_TOKEN" >"$TOKEN_FILE"
      copy_to_workers "$REMOTE_TOKEN" "$TOKEN_FILE"
      READ_TOKEN="HF_TOKEN=\"\$(cat \"\$HOME/$REMOTE_TOKEN\")\" && rm -f \"\$HOME/$REMOTE_TOKEN\" && export HF_TOKEN && "
    fi
    on_all_workers "${READ_TOKEN}mkdir -p '$PARENT' && python3 -m pip install -q huggingface_hub && export PATH=\"\$HOME/.local/bin:\$PATH\" && \
      hf download '$REPO' --local-dir '$PARENT/source' \
        --include '*.json' --include '*.safetensors' --include tokenizer.model && \
      python3 -m mixtral_jax convert '$PARENT/source' '$MODEL_DIR' --dtype bfloat16 && rm -rf '$PARENT/source'"
    ;;
  *)
    echo "$0: error: source must start with gs:// or hf:, got '$SOURCE'" >&2
    exit 2
    ;;
esac
