#!/usr/bin/env bash
# The newcomer's first command: sets up what is missing, builds tabletrace and
# runs the main job on the embedded default: `tabletrace run` with no config
# on the bundled sample (data/sample/mmqa) — program tracer and the local
# SmolLM2-135M as generators, preference pairs, LoRA Q&A SFT and CPO on
# SmolLM2, evaluation of base/SFT/CPO on held-out questions, and the report.
# About 14 minutes on a 2-core CPU after the first build. Outputs go to runs/default/ (a re-run
# resumes; `tabletrace run --from STAGE` redoes from a stage).
# Then the effect that matters, at the study's scale: the MMQA study's trained adapters
# (Qwen2.5-Coder-0.5B, docs/study/mmqa-qwen-protocol/arms/) against the base model on the
# sample's 31 questions of the study's held-out val split (none of them trained on), with
# the study's whole-table prompts (runs/demo-study/): about 10 more minutes (measured on
# 2026-12-04, alone on 2 cores, the base arm: 191 s at batch 8 against 251 s at batch 16
# in the same run, with the same answers — a batch decodes until its longest row ends).
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

echo
echo "== 3. the MMQA study's adapters (Qwen2.5-Coder-0.5B) on the sample's 31 held-out val questions"
study=docs/study/mmqa-qwen-protocol
out=runs/demo-study
for arm in base sft-qa cpo; do
  if [ -f "$out/$arm/eval.json" ]; then echo "$arm: done before ($out/$arm/eval.json)"; continue; fi
  adapter=()
  [ "$arm" = base ] || adapter=(--adapter "$study/arms/$arm/adapter")
  $bin eval --model qwen2.5-coder-0.5b --quantized "${adapter[@]}" --data data/sample/mmqa \
    --ids "$study/sample_val_ids.txt" --prompt-format trace --labels executed --table-tokens 3000 \
    --max-tokens 256 --batch 8 --out "$out/$arm/eval.json" --quiet >/dev/null
  echo "$arm: $out/$arm/eval.json"
done
$bin report "$out/base" "$out/sft-qa" "$out/cpo" --subset "unseen_sql=$study/eval_sets/unseen_sql.txt" \
  --baseline sft-qa --out "$out" --quiet >/dev/null
grep -A4 -m1 '^| run' "$out/report.md"
echo "Report: $out/report.md"
echo
echo "31 questions decide nothing; the study's evaluation of the same adapters on all 325 val"
echo "questions ($study/in-progress/val-report/report.md; the state of the study: $study/in-progress/README.md):"
grep -A4 -m1 '^| run' "$study/in-progress/val-report/report.md"
