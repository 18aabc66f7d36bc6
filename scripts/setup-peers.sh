#!/usr/bin/env bash
# Installs the peers the benchmarks compare against, once, into venvs in the
# tabletrace cache (never the repo):
#   $TABLETRACE_HOME/venv-llama : llama-cpp-python[server], built from source
#     for AVX2/FMA/F16C (this VM advertises AVX-512/AMX it does not enable, so a
#     native build dies with SIGILL); also the OpenAI-compatible test server.
#   $TABLETRACE_HOME/venv-torch : torch, transformers, gguf, accelerate (and trl,
#     peft for the trainer's references).
# Usage: scripts/setup-peers.sh [llama] [torch]   (default: both)
set -euo pipefail
home=${TABLETRACE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/tabletrace}
[ $# -gt 0 ] || set -- llama torch
for what in "$@"; do
  case "$what" in
    llama)
      v="$home/venv-llama"
      if ! "$v/bin/python" -c 'import llama_cpp' 2>/dev/null; then
        python3 -m venv "$v"
        CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF" \
          "$v/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir 'llama-cpp-python[server]'
      fi
      echo "llama-cpp-python: $v"
      ;;
    torch)
      v="$home/venv-torch"
      if ! "$v/bin/python" -c 'import torch, transformers, gguf, accelerate' 2>/dev/null; then
        python3 -m venv "$v"
        "$v/bin/pip" install --quiet --disable-pip-version-check torch transformers gguf accelerate safetensors trl peft
      fi
      echo "torch: $v"
      ;;
    *) echo "error: unknown peer $what (llama, torch)" >&2; exit 2 ;;
  esac
done
