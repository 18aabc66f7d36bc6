//! What the pipeline adds to the report after `tabletrace report`: a note on
//! failed LLM calls at the top of `report.md`, and each arm's compute in
//! `summary.json`.

use std::path::Path;

use crate::error::{file, Result};
use crate::run_dir::RunDir;

/// Says in report.md's first lines how many LLM calls failed (possible only
/// where `traces.max_failed` allows it): the pairs were made without them.
pub fn note_failed_calls(dir: &Path, max_failed: f64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(dir.join("traces").join("traces.jsonl")) else { return Ok(()) };
    let mut calls: std::collections::BTreeMap<String, (usize, usize)> = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Ok(t) = serde_json::from_str::<tabletrace_data::Trace>(line) else { continue };
        if t.generator == "program" {
            continue;
        }
        let e = calls.entry(t.generator.clone()).or_default();
        e.1 += 1;
        e.0 += usize::from(t.invalid_reason.as_deref().is_some_and(|r| r.starts_with("generation failed")));
    }
    let failed: Vec<String> =
        calls.iter().filter(|(_, (f, _))| *f > 0).map(|(g, (f, n))| format!("{f} of {n} calls to {g}")).collect();
    if failed.is_empty() {
        return Ok(());
    }
    let path = dir.join("report.md");
    let report = std::fs::read_to_string(&path).map_err(file(&path))?;
    let note = format!(
        "> **Failed LLM calls:** {} failed (allowed by traces.max_failed = {max_failed}); their questions have no \
         trace from that generator. Run again with traces redone (`--from traces`) to retry them.\n\n",
        failed.join(", ")
    );
    Ok(tabletrace_data::write_atomic(&path, (note + &report).as_bytes())?)
}

/// Adds each arm's wall time (`train-ARM`, `eval-ARM*` of `compute.json`)
/// and the shared stages' to `summary.json`.
pub fn add_compute_to_summary(run: &RunDir, arms: &[String]) -> Result<()> {
    let dir = run.path();
    let path = dir.join("summary.json");
    let text = std::fs::read_to_string(&path).map_err(file(&path))?;
    let mut summary: serde_json::Value = serde_json::from_str(&text).map_err(file(&path))?;
    let compute = run.compute();
    let sum = |pred: &dyn Fn(&str) -> bool| compute.iter().filter(|(k, _)| pred(k)).map(|(_, v)| v).sum::<f64>();
    for arm in arms {
        let eval_s = sum(&|k: &str| k == format!("eval-{arm}") || k.starts_with(&format!("eval-{arm}-")));
        // A training split over sessions may have been killed before the
        // pipeline could count its time: the steps' own seconds count then.
        let steps_s: f64 = std::fs::read_to_string(dir.join(arm).join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("step_seconds")?.as_f64())
            .sum();
        let train_s = sum(&|k: &str| k == format!("train-{arm}")).max(steps_s);
        if let Some(a) = summary["arms"].get_mut(arm) {
            // The base arm trains nothing: no train_seconds (an empty sum is -0.0).
            a["compute"] = if train_s > 0.0 {
                serde_json::json!({ "train_seconds": train_s, "eval_seconds": eval_s })
            } else {
                serde_json::json!({ "eval_seconds": eval_s })
            };
        }
    }
    summary["compute"] = serde_json::json!({
        "traces_seconds": sum(&|k: &str| k.starts_with("traces-")),
        "pairs_seconds": sum(&|k: &str| k.starts_with("pairs-")),
        "note": "wall seconds on this machine, summed over resumed runs (compute.json has every stage)",
    });
    let json = serde_json::to_string_pretty(&summary).expect("JSON values serialise");
    Ok(tabletrace_data::write_atomic(&path, json.as_bytes())?)
}
