#!/usr/bin/env bash
# The newcomer's first command: sets up what is missing, builds tabletrace and
# runs the most complete pipeline that exists on the bundled sample
# (data/sample): check the multi-table questions, make program-traced positive
# and negative reasoning traces for them, and ask the embedded SmolLM2 model one
# question over its tables. Outputs go to runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked -q -p tabletrace
bin=target/release/tabletrace
out=runs/demo
mkdir -p "$out"

echo "== 1. data: load the sample's questions and run every gold query"
$bin data check data/sample --show-issues 3

echo
echo "== 2. traces: SQL-grounded positives and typed negatives -> $out/traces.jsonl"
$bin traces --data data/sample/mmqa --polarity both --negatives 2 --out "$out/traces.jsonl"
python3 - "$out/traces.jsonl" <<'PY'
import json, sys
ts = [json.loads(l) for l in open(sys.argv[1])]
q = "mmqa_two_table:0"
for t in ts:
    if t["question_id"] == q and t["valid"]:
        kind = t["polarity"] + (f" ({t['error_type']})" if t["error_type"] else "")
        print(f"-- {q}, {kind}, faithfulness {t['faithfulness']:.2f}:\n{t['text']}\n")
PY

echo "== 3. the embedded model (SmolLM2-135M, f32 on CPU) answers one question over its tables"
prompt=$($bin data prompt data/sample/mmqa/mmqa_two_table.jsonl --id mmqa_two_table:6 --max-rows 10 2>/dev/null | sed '/^# Gold SQL/,$d')
echo "$prompt" | head -n 3
echo "..."
echo "-- model reply:"
printf '%s\n\nAnswer with the value only.' "$prompt" | $bin chat --model smollm2-135m --greedy --max-tokens 40
