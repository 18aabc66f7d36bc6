#!/usr/bin/env bash
# Fingerprints of the numbers a refactor must not change: the losses, log-probs
# and gradient norms of a 3-step CPO run and a 3-step trace-SFT run on
# SmolLM2-135M (the bundled sample's pairs), and greedy replies of SmolLM2 and of
# Qwen2.5-Coder-0.5B (f32 and --quantized). Wall-clock fields are left out.
#
#   tools/refcheck.sh BIN OUT.txt      # run BIN, write the fingerprints
#   diff before.txt after.txt           # identical = bit-identical numbers
#
# Needs the models from scripts/fetch-models.sh and a pairs file made by the
# demo (runs/default/pairs/pairs.jsonl) or given as PAIRS=...
set -euo pipefail
bin=$(realpath "$1"); out=$(realpath -m "$2")
cd "$(dirname "$0")/.."
pairs=${PAIRS:-runs/default/pairs/pairs.jsonl}
[ -f "$pairs" ] || { echo "refcheck: no pairs at $pairs (run scripts/demo.sh or set PAIRS)" >&2; exit 2; }
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
head -n 8 "$pairs" > "$work/pairs.jsonl"
: > "$out"
for method in cpo sft-trace; do
  "$bin" train --quiet --method "$method" --model smollm2-135m --train "$work/pairs.jsonl" \
    --eval-fraction 0 --output-dir "$work/$method" --max-steps 3 --batch-size 2 --grad-accum 1 \
    --save-every 100 --seed 7 > "$work/$method.log" 2>&1 || { cat "$work/$method.log"; exit 1; }
  echo "== train $method (3 steps)" >> "$out"
  python3 - "$work/$method/metrics.jsonl" >> "$out" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    keep = {k: v for k, v in m.items() if "second" not in k and "time" not in k and "rss" not in k}
    print(json.dumps(keep, sort_keys=True))
PY
done
prompt='Table singer(id, name, age): (1, Ann, 31), (2, Bo, 45), (3, Cy, 27). How many singers are older than 30? Answer briefly.'
for spec in "smollm2-135m" "qwen2.5-coder-0.5b" "qwen2.5-coder-0.5b --quantized"; do
  echo "== chat $spec (greedy, 40 tokens)" >> "$out"
  # shellcheck disable=SC2086
  "$bin" chat --quiet --model $spec --greedy --max-tokens 40 --prompt "$prompt" >> "$out"
  echo >> "$out"
done
echo "refcheck: wrote $out ($(wc -l < "$out") lines)"
