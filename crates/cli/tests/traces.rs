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
    assert!(stderr(&o).contains("positives"), "{}", stderr(&o));
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
