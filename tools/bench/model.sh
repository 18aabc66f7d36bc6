#!/usr/bin/env bash
# Benchmark of the model runtime beside its peers, measured in one run at the
# same thread counts: Hugging Face transformers (f32; SmolLM2 only) and
# llama.cpp (llama-cpp-python, the same GGUF). Prints one JSON line per
# (implementation, threads) and a table. Set-up of the peers:
# scripts/setup-peers.sh (once).
#   tools/bench/model.sh [THREADS...]                      SmolLM2-135M, 256-token prompt
#   MODEL=qwen2.5-coder-0.5b PROMPT_TOKENS=2000 tools/bench/model.sh [THREADS...]
# (default threads: 1 2)
#   KERNELS="best avx2": our quantised path also with its kernels forced down to
#   AVX2 (TABLETRACE_QUANT_KERNELS), as a CPU without AVX-512 VNNI runs it
#   (rows "quantized-avx2"); default: best only.
set -euo pipefail
cd "$(dirname "$0")/../.."
home=${TABLETRACE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/tabletrace}
model=${MODEL:-smollm2-135m}
case "$model" in
  smollm2-135m) gguf="$home/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"; peers="llama torch" ;;
  qwen2.5-coder-0.5b) gguf="$home/models/qwen2.5-coder-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"; peers="llama" ;;
  *) echo "error: MODEL must be smollm2-135m or qwen2.5-coder-0.5b" >&2; exit 2 ;;
esac
prompt=${PROMPT_TOKENS:-256}
new=${NEW_TOKENS:-64}
scripts/fetch-models.sh "$model" >/dev/null
scripts/setup-peers.sh $peers >/dev/null
cargo build --release --locked -q -p tabletrace
[ $# -gt 0 ] || set -- 1 2
out=$(mktemp)
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $model, $prompt-token prompt, $new new tokens"
for t in "$@"; do
  RAYON_NUM_THREADS=$t target/release/tabletrace bench generate --quiet --model "$gguf" \
    --prompt-tokens "$prompt" --new-tokens "$new" | tee -a "$out"
  for kernels in ${KERNELS:-best}; do
    if [ "$kernels" = best ]; then label=quantized; force=(); else label="quantized-$kernels"; force=(TABLETRACE_QUANT_KERNELS="$kernels"); fi
    env "${force[@]}" RAYON_NUM_THREADS=$t target/release/tabletrace bench generate --quiet --model "$gguf" --quantized \
      --prompt-tokens "$prompt" --new-tokens "$new" |
      python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); r["weights"]=sys.argv[1]; print(json.dumps(r))' "$label" |
      tee -a "$out"
  done
  if [[ $peers == *torch* ]]; then
    OMP_NUM_THREADS=$t "$home/venv-torch/bin/python" tools/bench/model_peers.py transformers "$gguf" "$t" "$prompt" "$new" 2>/dev/null | tail -n1 | tee -a "$out"
  fi
  "$home/venv-llama/bin/python" tools/bench/model_peers.py llama "$gguf" "$t" "$prompt" "$new" 2>/dev/null | tail -n1 | tee -a "$out"
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
# Our quantised path(s) against llama.cpp at each thread count.
for t in sorted({r["threads"] for r in rows}):
    peer = next((r for r in rows if r["impl"] == "llama.cpp" and r["threads"] == t), None)
    for ours in (r for r in rows if r["impl"] == "tabletrace" and r["weights"].startswith("quantized") and r["threads"] == t):
        if peer:
            print(f"{t} thread(s): {ours['weights']} prefill {ours['prefill_tok_s'] / peer['prefill_tok_s']:.2f}x llama.cpp, "
                  f"decode b1 {ours['decode_b1_tok_s'] / peer['decode_b1_tok_s']:.2f}x, "
                  f"b8/b1 {ours['decode_b8_tok_s'] / ours['decode_b1_tok_s']:.2f}")
PY
