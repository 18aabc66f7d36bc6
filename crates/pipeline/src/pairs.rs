//! The pairs stage's own work around `tabletrace pairs`: the ablation
//! without program positives, and topping up heterogeneous pairs that are
//! too few to train on with homogeneous pairs of the other questions.

use std::collections::HashSet;
use std::path::Path;

use crate::config::TrainStage;
use crate::error::{file, Result};

/// Writes `traces` without the program tracer's positives to `out` (the
/// ablation in which positives come from LLM generators only).
pub fn without_program_positives(traces: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(traces).map_err(file(traces))?;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            !(v["generator"] == "program" && v["polarity"] == "positive")
        })
        .collect();
    Ok(tabletrace_data::write_atomic(out, (kept.join("\n") + "\n").as_bytes())?)
}

/// The pairs training takes: `max_steps × batch_size × grad_accum` (1 for
/// an epoch: any number will do).
pub fn needed(train: &TrainStage) -> usize {
    if train.max_steps > 0 {
        train.max_steps * train.batch_size * train.grad_accum.max(1)
    } else {
        1
    }
}

/// The non-empty lines of a pairs file.
pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(file(path))?;
    Ok(text.lines().filter(|l| !l.trim().is_empty()).map(String::from).collect())
}

/// The pairs of `homogeneous` whose question has none in `pairs` (JSONL
/// lines with `metadata.question_id`).
pub fn top_up(pairs: &[String], homogeneous: Vec<String>) -> Vec<String> {
    let question = |l: &str| -> String {
        serde_json::from_str::<serde_json::Value>(l)
            .ok()
            .and_then(|v| v["metadata"]["question_id"].as_str().map(String::from))
            .unwrap_or_default()
    };
    let have: HashSet<String> = pairs.iter().map(|l| question(l)).collect();
    homogeneous.into_iter().filter(|l| !have.contains(&question(l))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(q: &str, tag: &str) -> String {
        format!(r#"{{"prompt":"{tag}","metadata":{{"question_id":"{q}"}}}}"#)
    }

    #[test]
    fn homogeneous_pairs_fill_in_only_questions_without_a_pair() {
        let het = vec![pair("q1", "het")];
        let homo = vec![pair("q1", "homo"), pair("q2", "homo"), pair("q2", "homo2")];
        assert_eq!(top_up(&het, homo), vec![pair("q2", "homo"), pair("q2", "homo2")]);
        let t = TrainStage { max_steps: 10, batch_size: 2, grad_accum: 3, ..TrainStage::default() };
        assert_eq!(needed(&t), 60);
        assert_eq!(needed(&TrainStage { max_steps: 0, ..t }), 1);
    }

    #[test]
    fn the_ablation_drops_program_positives_only() {
        let tmp = tempfile::tempdir().unwrap();
        let traces = tmp.path().join("t.jsonl");
        std::fs::write(
            &traces,
            [
                r#"{"generator":"program","polarity":"positive"}"#,
                r#"{"generator":"program","polarity":"negative"}"#,
                r#"{"generator":"local:m","polarity":"positive"}"#,
            ]
            .join("\n"),
        )
        .unwrap();
        let out = tmp.path().join("o.jsonl");
        without_program_positives(&traces, &out).unwrap();
        let kept = read_lines(&out).unwrap();
        assert_eq!(kept.len(), 2);
        assert!(!kept.iter().any(|l| l.contains(r#""program","polarity":"positive""#)));
    }
}
