#!/usr/bin/env bash
# Benchmark of one CPO training step on SmolLM2-135M (f32, LoRA r=16 on all
# seven projections, 4 pairs of 384 prompt + 128 completion tokens), ours
# beside TRL's CPOTrainer on the same pairs and config, measured in one run at
# the same thread counts: median step time after the first step, tokens/s and
# peak RSS.
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
done
python3 - "$work/rows" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"\n{'impl':<24} {'threads':>7} {'tokens/s':>9} {'peak MiB':>9}")
for r in rows:
    print(f"{r['impl']:<24} {r['threads']:>7} {r['tokens_per_s']:9.1f} {r['peak_rss_mib']:9.0f}")
PY
