#!/usr/bin/env bash
# Run `mixtral-jax generate` on every worker at once; process 0 prints. Arguments go to generate, e.g.
#   scripts/tpu/generate.sh --mesh expert=8 --prompt "The capital of France is"
# On a TPU VM the processes find each other by themselves (no --coordinator-address needed).
# generate's own options are listed by `mixtral-jax generate --help`.
source "$(dirname "$0")/common.sh" "$@"

ARGS=""
for arg in "$@"; do
  ARGS+=" $(printf '%q' "$arg")"
done
on_all_workers "python3 -m mixtral_jax generate --checkpoint '$MODEL_DIR'$ARGS"
