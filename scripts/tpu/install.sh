#!/usr/bin/env bash
# Build this checkout into a wheel, copy it to every worker and install it with JAX for TPU.
source "$(dirname "$0")/common.sh" "$@"
take_no_arguments "$@"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
JAX_VERSION="$(sed -n 's/^ *"jax==\([0-9.]*\)".*/\1/p' "$ROOT/pyproject.toml")"

DIST="$(mktemp -d)"
trap 'rm -rf "$DIST"' EXIT
python3 -m pip wheel --no-deps --wheel-dir "$DIST" "$ROOT"
WHEEL="$(basename "$(ls "$DIST"/mixtral_jax-*.whl)")"
copy_to_workers "/tmp/" "$DIST/$WHEEL"
on_all_workers "python3 -m pip install --upgrade pip && \
  python3 -m pip install 'jax[tpu]==$JAX_VERSION' '/tmp/$WHEEL' && \
  python3 -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
