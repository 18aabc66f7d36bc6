#!/usr/bin/env bash
# Runs every tabletrace test. Idempotent: on a fresh machine it first sets up
# what the tests need (see scripts/setup.sh). Tests on the full public data run
# when ../shared/data is present (it is in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
fi
cargo test --workspace --locked
