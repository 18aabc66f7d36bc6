//! `tabletrace traces`: the acceptance fields of every line.

use crate::{stderr, tabletrace};

#[test]
fn program_traces_have_the_documented_fields() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("traces.jsonl");
    let o = tabletrace(&[
        "traces",
        "--data",
        "data/sample/mmqa/mmqa_two_table.jsonl",
        "--generator",
        "program",
        "--polarity",
        "both",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("program                  positive"), "{}", stderr(&o));
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.len() > 100);
    for l in &lines {
        for key in
            ["question_id", "generator", "polarity", "text", "final_answer", "valid", "error_type", "faithfulness"]
        {
            assert!(l.get(key).is_some(), "missing {key}: {l}");
        }
    }
    let negatives = lines.iter().filter(|l| l["polarity"] == "negative").count();
    assert!(negatives > 50 && lines.iter().any(|l| l["polarity"] == "positive"));
    assert!(!dir.path().join("traces.jsonl.tmp").exists(), "written atomically");
}

#[test]
fn unknown_generator_is_refused() {
    let o = tabletrace(&["traces", "--data", "data/sample/mmqa", "--generator", "gpt9", "--out", "/tmp/never.jsonl"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("generator \"gpt9\""), "{}", stderr(&o));
}

#[test]
fn pairs_from_program_traces() {
    let dir = tempfile::tempdir().unwrap();
    let traces = dir.path().join("traces.jsonl");
    let o =
        tabletrace(&["traces", "--data", "data/sample/mmqa/mmqa_three_table.jsonl", "--out", traces.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let pairs = dir.path().join("pairs.jsonl");
    let run = |extra: &[&str]| {
        let mut args =
            vec!["pairs", "--traces", traces.to_str().unwrap(), "--data", "data/sample/mmqa/mmqa_three_table.jsonl"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--out", pairs.to_str().unwrap()]);
        let o = tabletrace(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let lines: Vec<serde_json::Value> =
            std::fs::read_to_string(&pairs).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        (lines, stderr(&o))
    };
    // One generator: the heterogeneous default pairs nothing, and says why.
    let (lines, err) = run(&[]);
    assert!(lines.is_empty());
    assert!(err.contains("questions without a positive and a negative from different generators"), "{err}");
    let (lines, _) = run(&["--policy", "homogeneous", "--max-per-question", "2"]);
    assert!(lines.len() > 100);
    for l in &lines {
        assert!(l["prompt"].as_str().unwrap().contains("Question:"));
        assert_ne!(l["chosen"], l["rejected"]);
        assert_eq!(l["metadata"]["chosen_generator"], "program");
        assert!(l["metadata"]["error_type"].is_string());
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("pairs.report.json")).unwrap()).unwrap();
    assert_eq!(report["pairs"], lines.len());
    let (conv, _) = run(&["--policy", "homogeneous", "--format", "conversational"]);
    assert_eq!(conv[0]["chosen"][0]["role"], "assistant");
    let (short, err) = run(&["--policy", "homogeneous", "--max-length", "800", "--tokenizer", "smollm2-135m"]);
    assert!(short.len() < conv.len() && err.contains("pairs longer than 800 tokens"), "{err}");
}
