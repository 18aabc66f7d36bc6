#!/usr/bin/env bash
# Benchmark of the model runtime on SmolLM2-135M, beside Hugging Face
# transformers (f32) and llama.cpp (the same GGUF), measured in one run at the
# same thread counts. Prints one JSON line per (implementation, threads) and a
# table. Set-up of the peers: scripts/setup-peers.sh (once).
#   tools/bench/model.sh [THREADS...]   (default: 1 2)
set -euo pipefail
cd "$(dirname "$0")/../.."
home=${TABLETRACE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/tabletrace}
gguf="$home/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
scripts/fetch-models.sh smollm2-135m >/dev/null
scripts/setup-peers.sh llama torch >/dev/null
cargo build --release --locked -q -p tabletrace
[ $# -gt 0 ] || set -- 1 2
out=$(mktemp)
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for t in "$@"; do
  RAYON_NUM_THREADS=$t target/release/tabletrace bench generate --model "$gguf" | tee -a "$out"
  RAYON_NUM_THREADS=$t target/release/tabletrace bench generate --model "$gguf" --quantized | tee -a "$out"
  OMP_NUM_THREADS=$t "$home/venv-torch/bin/python" tools/bench/model_peers.py transformers "$gguf" "$t" 2>/dev/null | tail -n1 | tee -a "$out"
  "$home/venv-llama/bin/python" tools/bench/model_peers.py llama "$gguf" "$t" 2>/dev/null | tail -n1 | tee -a "$out"
done
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"\n{'impl':<12} {'weights':<10} {'threads':>7} {'prefill tok/s':>14} {'decode b1':>10} {'decode b8':>10} {'b8/b1':>6} {'peak MiB':>9}")
for r in rows:
    b1, b8 = r.get("decode_b1_tok_s"), r.get("decode_b8_tok_s")
    f = lambda v: f"{v:10.1f}" if v is not None else f"{'-':>10}"
    ratio = f"{b8 / b1:6.2f}" if b1 and b8 else f"{'-':>6}"
    print(f"{r['impl']:<12} {r['weights']:<10} {r['threads']:>7} {r['prefill_tok_s']:14.1f} {f(b1)} {f(b8)} {ratio} {r['peak_rss_mib']:9.0f}")
PY
