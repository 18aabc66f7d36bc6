#!/usr/bin/env bash
# The newcomer's first command: sets up what is missing, builds tabletrace and
# runs the main job on the embedded default: `tabletrace run` with no config
# on the bundled sample (data/sample/mmqa) — program tracer and the local
# SmolLM2-135M as generators, preference pairs, LoRA Q&A SFT and CPO on
# SmolLM2, evaluation of base/SFT/CPO on held-out questions, and the report.
# About 14 minutes on a 2-core CPU after the first build. Outputs go to runs/default/ (a re-run
# resumes; `tabletrace run --from STAGE` redoes from a stage).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked -q -p tabletrace
bin=target/release/tabletrace

echo "== 1. data: load the sample's questions and run every gold query"
$bin data check data/sample --show-issues 3

echo
echo "== 2. the pipeline on the embedded default (runs/default)"
$bin run
echo
echo "Report: runs/default/report.md (charts: runs/default/accuracy.png, training.png);"
echo "browse every question, answer and pair: runs/default/report.html"
