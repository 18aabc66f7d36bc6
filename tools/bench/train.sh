#!/usr/bin/env bash
# Benchmark of one CPO training step on SmolLM2-135M (f32, LoRA r=16 on all
# seven projections, 4 pairs of 384 prompt + 128 completion tokens), ours
# beside TRL's CPOTrainer on the same pairs and config, measured in one run at
# the same thread counts: median step time after the first step, tokens/s and
# peak RSS; our step's achieved GFLOP/s against the 4096² f32 matmul rate of
# candle (our products) and torch, measured in the same run.
#   tools/bench/train.sh [THREADS...]   (default: 2)
#   CKPT="true false" also runs ours without activation checkpointing (needs
#   far more memory: every layer's attention graph is kept).
set -euo pipefail
cd "$(dirname "$0")/../.."
home=${TABLETRACE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/tabletrace}
dir="$home/models/smollm2-135m"
gguf=SmolLM2-135M-Instruct.Q4_1.gguf
scripts/fetch-models.sh smollm2-135m >/dev/null
scripts/setup-peers.sh torch >/dev/null
cargo build --release --locked -q -p tabletrace
py="$home/venv-torch/bin/python"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
[ $# -gt 0 ] || set -- 2
steps=${STEPS:-4}
"$py" tools/bench/train_peer.py make "$dir" "$gguf" "$work/pairs.jsonl" 2>/dev/null
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $steps steps"
for t in "$@"; do
  for ckpt in ${CKPT:-true}; do
    cat > "$work/train.toml" <<TOML
train = "$work/pairs.jsonl"
output_dir = "$work/ours-$t-$ckpt"
model = "$dir/$gguf"
batch_size = 4
max_steps = $steps
max_length = 1024
save_every = 0
activation_checkpointing = $ckpt
[lora]
r = 16
alpha = 32.0
TOML
    RAYON_NUM_THREADS=$t /usr/bin/time -f '%M' -o "$work/rss" target/release/tabletrace train --config "$work/train.toml" --quiet >/dev/null 2>"$work/err" || { cat "$work/err"; exit 1; }
    python3 - "$work/ours-$t-$ckpt/metrics.jsonl" "$(cat "$work/rss")" "$t" "$ckpt" <<'PY'
import json, sys
ms = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
tps = sorted(m["tokens_per_second"] for m in ms[1:]) or [ms[0]["tokens_per_second"]]
tps = tps[len(tps) // 2]
print(json.dumps({"impl": "tabletrace" + ("" if sys.argv[4] == "true" else " (no ckpt)"), "threads": int(sys.argv[3]),
                  "tokens_per_s": tps, "peak_rss_mib": int(sys.argv[2]) / 1024}))
PY
  done | tee -a "$work/rows"
  OMP_NUM_THREADS=$t /usr/bin/time -f '%M' -o "$work/rss" "$py" tools/bench/train_peer.py trl "$dir" "$gguf" "$work/pairs.jsonl" "$t" "$steps" 2>/dev/null | tail -n1 | tee -a "$work/rows"
  OMP_NUM_THREADS=$t "$py" tools/bench/train_peer.py peak "$t" 2>/dev/null | tail -n1 >> "$work/peaks"
  RAYON_NUM_THREADS=$t target/release/tabletrace bench matmul >> "$work/peaks"
done
python3 - "$work/rows" "$work/peaks" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
peaks = {}
for p in map(json.loads, open(sys.argv[2])):
    peaks.setdefault(p["threads"], {})[p.get("impl", "torch")] = p["matmul_gflops"]
# FLOPs of our step for this config (SmolLM2-135M: 30 layers, hidden 576,
# intermediate 1536, 9 heads / 3 kv heads of 64, vocab 49152; LoRA r 16 on
# all seven projections): 4 pairs forwarded as 384 + 2 × 128 = 640 tokens
# each (the prompt once). Body products per token and layer: the first pass
# (all 7), the recomputation (q, k, v, o: gate/up are kept, down is
# skipped) and the input-gradient backward (all 7); LoRA: ~4 passes of its
# two rank-16 products; attention over the visible key spans (~55% of the
# 640² scores; 2 products forward, 2 recomputed, 4 backward); the output
# layer at the 129 scored positions of each sequence (forward, and twice
# in the backward). TRL forwards 1,024 tokens per pair, all 7 projections,
# and the output layer at every position.
L, H, I, V, r = 30, 576, 1536, 49152, 16
proj = {"q": (H, H), "k": (H, 192), "v": (H, 192), "o": (H, H), "gate": (H, I), "up": (H, I), "down": (I, H)}
mm = lambda names: sum(2 * a * b for n, (a, b) in proj.items() if n in names)
tokens, rows_ = 4 * 640, 4
body = tokens * L * (mm(proj) + mm({"q", "k", "v", "o"}) + mm(proj))
lora = tokens * L * 4 * sum(2 * r * (a + b) for a, b in proj.values())
attn = rows_ * L * 8 * 9 * 0.55 * 2 * 640 * 640 * 64
head = 3 * 2 * (8 * 129) * V * H
ours_flops = body + lora + attn + head
print(f"\n{'impl':<24} {'threads':>7} {'tokens/s':>9} {'peak MiB':>9} {'GFLOP/s':>8} {'of peak':>8}")
for r_ in rows:
    g = ""
    if r_["impl"] == "tabletrace":
        gf = ours_flops / (4096 / r_["tokens_per_s"]) / 1e9
        g = f"{gf:8.0f} {gf / max(peaks[r_['threads']].values()):7.0%}"
    print(f"{r_['impl']:<24} {r_['threads']:>7} {r_['tokens_per_s']:9.1f} {r_['peak_rss_mib']:9.0f} {g}")
print(f"our step: {ours_flops / 1e9:.0f} GFLOP; 'of peak': against the faster 4096² f32 product below")
for t, p in sorted(peaks.items()):
    print(f"f32 matmul, {t} threads: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in sorted(p.items())))
PY
