#!/usr/bin/env bash
# Put a checkpoint on every worker at $MODEL_DIR (each host reads only its own shards, but from local files).
#   scripts/tpu/checkpoint.sh gs://BUCKET/PATH         copy a model folder or checkpoint from Cloud Storage
#   scripts/tpu/checkpoint.sh hf:mistralai/Mixtral-8x7B-v0.1  download from the Hugging Face Hub and convert
# A Hub download needs HF_TOKEN in the environment for gated repositories.
source "$(dirname "$0")/common.sh"

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
    on_all_workers "mkdir -p '$PARENT' && python3 -m pip install -q huggingface_hub && export PATH=\"\$HOME/.local/bin:\$PATH\" && \
      HF_TOKEN='${HF_TOKEN:-}' hf download '$REPO' --local-dir '$PARENT/source' \
        --include '*.json' --include '*.safetensors' --include tokenizer.model && \
      python3 -m mixtral_jax convert '$PARENT/source' '$MODEL_DIR' --dtype bfloat16 && rm -rf '$PARENT/source'"
    ;;
  *)
    echo "$0: error: source must start with gs:// or hf:, got '$SOURCE'" >&2
    exit 2
    ;;
esac
