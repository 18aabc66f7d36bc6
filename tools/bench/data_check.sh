#!/usr/bin/env bash
# Benchmark: questions/second of `tabletrace data check` over Spider train,
# beside a Python sqlite3 loop doing the same queries, in the same run.
# Both are single-threaded. Goal: >= 1,000 questions/s for tabletrace.
#   tools/bench/data_check.sh [SPIDER_DIR]   (default ../shared/data/spider)
set -euo pipefail
cd "$(dirname "$0")/../.."
spider=${1:-../shared/data/spider}
cargo build --release --locked -q -p tabletrace
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); threads: 1"
for run in 1 2 3; do
  ours=$(target/release/tabletrace data check "$spider/train_spider.json" --db-dir "$spider/database" --json --quiet |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["loaded"], r["sql_ok"], r["seconds"])')
  peer=$(python3 tools/bench/data_check_peer.py "$spider/train_spider.json" "$spider/database" |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["sql_ok"], r["seconds"])')
  read -r loaded ok secs <<<"$ours"
  read -r pok psecs <<<"$peer"
  python3 -c "print(f'run $run: tabletrace {$loaded/$secs:8.0f} questions/s ({$ok} ran, {$secs:.3f} s) | python sqlite3 {$loaded/$psecs:8.0f} questions/s ({$pok} ran, {$psecs:.3f} s)')"
done
