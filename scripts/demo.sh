#!/usr/bin/env bash
# The newcomer's first command: builds tabletrace and runs the most complete
# pipeline that exists on the bundled sample (data/sample): load and check the
# multi-table questions, then show one question with its tables as a prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked -q -p tabletrace
bin=target/release/tabletrace
echo "== tabletrace data inspect data/sample/mmqa/mmqa_two_table.jsonl"
$bin data inspect data/sample/mmqa/mmqa_two_table.jsonl
echo
echo "== tabletrace data check data/sample"
$bin data check data/sample --show-issues 5
echo
echo "== tabletrace data prompt data/sample/mmqa/mmqa_three_table.jsonl --id mmqa_three_table:0 --max-rows 8"
$bin data prompt data/sample/mmqa/mmqa_three_table.jsonl --id mmqa_three_table:0 --max-rows 8
