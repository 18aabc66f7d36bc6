//! `tabletrace eval`, `report` and `run` on the bundled sample with SmolLM2:
//! the documented fields, a resumable run directory, and clear config errors.

use crate::{stderr, stdout, tabletrace};

#[test]
fn eval_json_has_the_documented_fields_and_predictions() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("base/eval.json");
    let o = tabletrace(&[
        "eval",
        "--model",
        "smollm2-135m",
        "--data",
        "data/sample/mmqa/mmqa_three_table.jsonl",
        "--limit",
        "4",
        "--max-tokens",
        "24",
        "--max-rows",
        "3",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for k in ["n", "em", "pm", "f1", "by_tables", "by_kind", "labels"] {
        assert!(v.get(k).is_some(), "eval.json lacks {k}");
    }
    assert_eq!(v["n"], 4);
    assert!(v["by_tables"].get("3").is_some(), "{}", v["by_tables"]);
    let preds = std::fs::read_to_string(out.with_file_name("predictions.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(preds.lines().next().unwrap()).unwrap();
    for k in ["id", "prompt", "output", "answer", "gold", "em"] {
        assert!(first.get(k).is_some(), "predictions lack {k}");
    }
    let o = tabletrace(&["report", dir.path().join("base").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("| base | 4 |"), "{}", stdout(&o));
    assert!(dir.path().join("accuracy.png").is_file() && dir.path().join("report.md").is_file());
}

#[test]
fn a_small_pipeline_runs_resumes_and_redoes_from_a_stage() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("pipeline.toml");
    let run = dir.path().join("run");
    std::fs::write(
        &cfg,
        format!(
            "run_dir = {:?}\ndata = \"data/sample/mmqa/mmqa_two_table.jsonl\"\neval_fraction = 0.1\nmax_rows = 3\n\
             [traces]\ngenerators = [\"program\"]\n[pairs]\npolicy = \"homogeneous\"\n\
             [train]\nmethods = [\"sft-qa\"]\nmax_steps = 1\nmax_length = 512\n[eval]\nlimit = 3\nmax_tokens = 16\n",
            run.to_str().unwrap()
        ),
    )
    .unwrap();
    let o = tabletrace(&["run", cfg.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "train_ids.txt",
        "eval_ids.txt",
        "traces/traces.jsonl",
        "pairs/pairs.jsonl",
        "sft-qa/adapter/adapter_config.json",
        "base/eval.json",
        "sft-qa/eval.json",
        "report.md",
        "accuracy.png",
    ] {
        assert!(run.join(f).is_file(), "{f} is missing");
    }
    // A second run skips every finished stage.
    let o = tabletrace(&["run", cfg.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("== train"), "{}", stderr(&o));
    // --from eval redoes evaluation only.
    let o = tabletrace(&["run", cfg.to_str().unwrap(), "--from", "eval", "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("== eval: base") && !stderr(&o).contains("== train"), "{}", stderr(&o));
}

#[test]
fn pipeline_config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("pipeline.toml");
    std::fs::write(&cfg, "[train]\nmethods = [\"dpo\"]\n").unwrap();
    let o = tabletrace(&["run", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("train.methods") && stderr(&o).contains("dpo"), "{}", stderr(&o));
    std::fs::write(&cfg, "[trace]\ngenerators = []\n").unwrap();
    let o = tabletrace(&["run", cfg.to_str().unwrap()]);
    assert!(stderr(&o).contains("trace"), "{}", stderr(&o));
}
