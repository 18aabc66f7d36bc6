#!/usr/bin/env bash
# Puts a study's committed, finished training arms back into its run
# directory, so that `tabletrace run` on a new machine skips them instead of
# training again (the run directory itself is not committed):
#   scripts/restore-study.sh docs/study/mmqa-qwen-protocol/arms runs/mmqa-qwen
# Each ARMS/<arm>/ holds what training left (adapter in f16, metrics,
# configs) and train.done, the pipeline's marker of the arm's settings. The
# data, traces and pairs stages redo themselves (about a minute,
# deterministic, same settings); the adapter is the committed f16 copy
# (tabletrace computes in f32; it is the adapter summary.json names).
# An arm's finished evaluations come back too: ARMS/<arm>/<set>/ (val/ for the
# held-out split, cross_db/, music_2/) with eval.json, predictions.jsonl and
# eval.done, the pipeline's marker, so they are not run again; the base
# model's arm (ARMS/base/) holds evaluations only. `tabletrace run CONFIG
# --plan` shows what is then done and what a run would still do.
set -euo pipefail
arms="${1:?usage: scripts/restore-study.sh ARMS_DIR RUN_DIR}"
run="${2:?usage: scripts/restore-study.sh ARMS_DIR RUN_DIR}"
mkdir -p "$run"

# restore_evals ARM_DIR ARM: each finished evaluation of ARM_DIR into the run.
restore_evals() {
  local dir="$1" arm="$2" ev set_dir set dest key
  for ev in "$dir"*/eval.done; do
    [ -f "$ev" ] || continue
    set_dir="$(dirname "$ev")"
    set="$(basename "$set_dir")"
    if [ "$set" = val ]; then dest="$run/$arm"; key="$arm"; else dest="$run/$arm/$set"; key="$arm-$set"; fi
    if [ -f "$run/.eval-$key.done" ] && [ -f "$dest/eval.json" ]; then
      echo "keep the evaluation of $arm on $set: already in $dest"
      continue
    fi
    mkdir -p "$dest"
    cp "$set_dir/eval.json" "$set_dir/predictions.jsonl" "$dest/"
    cp "$ev" "$run/.eval-$key.done"
    echo "restored the evaluation of $arm on ${set} into $dest"
  done
}

for dir in "$arms"/*/; do
  arm="$(basename "$dir")"
  if [ "$arm" = base ]; then
    restore_evals "$dir" base
    continue
  fi
  if [ ! -f "$dir/train.done" ] || [ ! -f "$dir/adapter/adapter_model.safetensors" ]; then
    echo "skip $arm: no train.done or adapter" >&2
    continue
  fi
  if [ -f "$run/.train-$arm.done" ] && [ -f "$run/$arm/adapter/adapter_model.safetensors" ]; then
    echo "keep $arm: already trained in $run"
  else
    rm -rf "${run:?}/$arm"
    mkdir -p "$run/$arm"
    cp -r "$dir/adapter" "$run/$arm/adapter"
    for f in metrics.jsonl train.toml train_config.json tokenize_report.json curves.png; do
      [ -f "$dir/$f" ] && cp "$dir/$f" "$run/$arm/$f"
    done
    cp "$dir/train.done" "$run/$arm/.train-settings"
    cp "$dir/train.done" "$run/.train-$arm.done"
    echo "restored $arm into $run/$arm"
  fi
  restore_evals "$dir" "$arm"
done
