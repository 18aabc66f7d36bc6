#!/usr/bin/env bash
# Benchmark of one CPO training step (f32, LoRA r=16 on all seven
# projections), ours beside TRL's CPOTrainer on the same pairs and config,
# measured in one run at the same thread counts: median step time after the
# first step, tokens/s and peak RSS; our step's achieved GFLOP/s against the
# 4096² f32 matmul rate of candle (our products) and torch, measured in the
# same run.
#   tools/bench/train.sh [THREADS...]   (default: 2)
# Workloads (MODEL=…):
#   smollm2-135m (default): 4 pairs of 384 prompt + 128 completion tokens
#   qwen2.5-coder-0.5b: the study's, 1 pair of 1,500 prompt + 200 completion
#     tokens (a table-length prompt; TRL holds 3,400 tokens per pair)
# PROMPT_TOKENS, COMPLETION_TOKENS and PAIRS (pairs per step) override them.
#   CKPT="true false" also runs ours without activation checkpointing (needs
#   far more memory: every layer's attention graph is kept).
#   KEEP_MLP=false: ours without keeping the gate/up products (less memory).
#   PRECISION="f32 bf16": ours with f32 products and with `bf16_products`
#   (default: both where the CPU has AMX-BF16, else f32).
set -euo pipefail
cd "$(dirname "$0")/../.."
home=${TABLETRACE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/tabletrace}
model=${MODEL:-smollm2-135m}
case "$model" in
  smollm2-135m) gguf=SmolLM2-135M-Instruct.Q4_1.gguf; defaults=(384 128 4) ;;
  qwen2.5-coder-0.5b) gguf=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf; defaults=(1500 200 1) ;;
  *) echo "error: MODEL must be smollm2-135m or qwen2.5-coder-0.5b" >&2; exit 2 ;;
esac
prompt=${PROMPT_TOKENS:-${defaults[0]}}
completion=${COMPLETION_TOKENS:-${defaults[1]}}
pairs=${PAIRS:-${defaults[2]}}
max_length=$((prompt + completion + 8))
dir="$home/models/$model"
scripts/fetch-models.sh "$model" >/dev/null
scripts/setup-peers.sh torch >/dev/null
cargo build --release --locked -q -p tabletrace
py="$home/venv-torch/bin/python"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
[ $# -gt 0 ] || set -- 2
steps=${STEPS:-4}
"$py" tools/bench/train_peer.py make "$dir" "$gguf" "$work/pairs.jsonl" "$pairs" "$prompt" "$completion" 2>/dev/null
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $steps steps"
echo "workload: $model, $pairs pair(s) per step of $prompt prompt + $completion completion tokens"
precisions=${PRECISION:-f32 $(grep -qw amx_bf16 /proc/cpuinfo && echo bf16)}
for t in "$@"; do
  for ckpt in ${CKPT:-true}; do
  for prec in $precisions; do
    cat > "$work/train.toml" <<TOML
bf16_products = $([ "$prec" = bf16 ] && echo true || echo false)
train = "$work/pairs.jsonl"
output_dir = "$work/ours-$t-$ckpt-$prec"
model = "$dir/$gguf"
batch_size = $pairs
max_steps = $steps
max_length = $max_length
save_every = 0
activation_checkpointing = $ckpt
keep_mlp_products = ${KEEP_MLP:-true}
[lora]
r = 16
alpha = 32.0
TOML
    RAYON_NUM_THREADS=$t /usr/bin/time -f '%M' -o "$work/rss" target/release/tabletrace train --config "$work/train.toml" --quiet >/dev/null 2>"$work/err" || { cat "$work/err"; exit 1; }
    python3 - "$work/ours-$t-$ckpt-$prec/metrics.jsonl" "$(cat "$work/rss")" "$t" "$ckpt" "$prec" <<'PY'
import json, sys
ms = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
tps = sorted(m["tokens_per_second"] for m in ms[1:]) or [ms[0]["tokens_per_second"]]
tps = tps[len(tps) // 2]
print(json.dumps({"impl": "tabletrace" + ("" if sys.argv[4] == "true" else " (no ckpt)") + ("" if sys.argv[5] == "f32" else " bf16"),
                  "threads": int(sys.argv[3]), "tokens_per_s": tps, "peak_rss_mib": int(sys.argv[2]) / 1024}))
PY
  done
  done | tee -a "$work/rows"
  OMP_NUM_THREADS=$t /usr/bin/time -f '%M' -o "$work/rss" "$py" tools/bench/train_peer.py trl "$dir" "$gguf" "$work/pairs.jsonl" "$t" "$steps" "$max_length" 2>/dev/null | tail -n1 | tee -a "$work/rows"
  OMP_NUM_THREADS=$t "$py" tools/bench/train_peer.py peak "$t" 2>/dev/null | tail -n1 >> "$work/peaks"
  RAYON_NUM_THREADS=$t target/release/tabletrace bench matmul >> "$work/peaks"
done
python3 - "$work/rows" "$work/peaks" "$model" "$pairs" "$prompt" "$completion" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
peaks = {}
for p in map(json.loads, open(sys.argv[2])):
    peaks.setdefault(p["threads"], {})[p.get("impl", "torch")] = p["matmul_gflops"]
model, pairs, prompt, completion = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
# FLOPs of our step for this workload (LoRA r 16 on all seven projections):
# each pair forwarded as prompt + 2 × completion tokens (the prompt once).
# Body products per token and layer: the first pass (all 7), the
# recomputation (q, k, v, o: gate/up are kept, down is skipped) and the
# input-gradient backward (all 7); LoRA: ~4 passes of its two rank-16
# products; attention over the visible key spans (~55% of the causal
# scores; 2 products forward, 2 recomputed, 4 backward); the output layer at
# the scored positions of each sequence (forward, and twice in the
# backward). TRL forwards prompt + completion tokens twice per pair, all 7
# projections, and the output layer at every position.
#         layers hidden inter. heads kv  head_dim vocab
dims = {"smollm2-135m": (30, 576, 1536, 9, 3, 64, 49152),
        "qwen2.5-coder-0.5b": (24, 896, 4864, 14, 2, 64, 151936)}
L, H, I, nh, nkv, hd, V = dims[model]
r = 16
proj = {"q": (H, nh * hd), "k": (H, nkv * hd), "v": (H, nkv * hd), "o": (nh * hd, H), "gate": (H, I), "up": (H, I), "down": (I, H)}
mm = lambda names: sum(2 * a * b for n, (a, b) in proj.items() if n in names)
seq = prompt + 2 * completion
tokens = pairs * seq
body = tokens * L * (mm(proj) + mm({"q", "k", "v", "o"}) + mm(proj))
lora = tokens * L * 4 * sum(2 * r * (a + b) for a, b in proj.values())
attn = pairs * L * 8 * nh * 0.55 * 2 * seq * seq * hd
head = 3 * 2 * (2 * pairs * (completion + 1)) * V * H
ours_flops = body + lora + attn + head
trl_tokens = 2 * pairs * (prompt + completion)
print(f"\n{'impl':<24} {'threads':>7} {'tokens/s':>9} {'peak MiB':>9} {'GFLOP/s':>8} {'of peak':>8}")
for r_ in rows:
    g = ""
    if r_["impl"].startswith("tabletrace"):
        gf = ours_flops / (trl_tokens / r_["tokens_per_s"]) / 1e9
        g = f"{gf:8.0f} {gf / max(peaks[r_['threads']].values()):7.0%}"
    print(f"{r_['impl']:<24} {r_['threads']:>7} {r_['tokens_per_s']:9.1f} {r_['peak_rss_mib']:9.0f} {g}")
for t in sorted({r_["threads"] for r_ in rows}):
    by = {r_["impl"]: r_ for r_ in rows if r_["threads"] == t}
    for name in ("tabletrace", "tabletrace bf16"):
        if name in by and "trl" in by:
            ours, trl = by[name], by["trl"]
            print(f"{t} threads: {name} {ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x TRL's tokens/s "
                  f"at {ours['peak_rss_mib'] / trl['peak_rss_mib']:.2f}x its peak memory")
print(f"our step: {ours_flops / 1e9:.0f} GFLOP; 'of peak': against the faster 4096² f32 product below")
for t, p in sorted(peaks.items()):
    print(f"f32 matmul, {t} threads: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in sorted(p.items())))
PY
