#!/usr/bin/env bash
# Longer runs of the fuzzer in crates/trace/tests/fuzz.rs (the dataset
# loaders, the answer parser and matcher, SQL parsing and the program
# tracer). RUNS executions for the loaders, 5x that for the other two.
# Findings (panics, calls that never return) land in target/fuzz-findings/.
#   tools/fuzz.sh [RUNS]      default 1,000,000
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-1000000}"
TABLETRACE_FUZZ_RUNS="$runs" cargo test --release --offline -p tabletrace-trace --test integration fuzz -- \
  --nocapture --test-threads 1 2>&1 | grep -oE 'fuzz [a-z]+: .*|[0-9]+ findings in.*|test result.*'
