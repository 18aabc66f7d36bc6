//! `tabletrace eval`, `report` and `run` on the bundled sample with SmolLM2:
//! the documented fields, a resumable run directory, and clear config errors.

use std::path::Path;
use std::process::Output;

use crate::{stderr, stdout, tabletrace};

/// `tabletrace eval --quiet` of SmolLM2 on a sample file of
/// data/sample/mmqa/, writing `out`, with `flags` besides.
fn eval_sample(file: &str, flags: &[&str], out: &Path) -> Output {
    let data = format!("data/sample/mmqa/{file}");
    let mut args = vec!["eval", "--model", "smollm2-135m", "--data", &data];
    args.extend_from_slice(flags);
    args.extend(["--out", out.to_str().unwrap(), "--quiet"]);
    tabletrace(&args)
}

#[test]
fn eval_json_has_the_documented_fields_and_predictions() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("base/eval.json");
    let o =
        eval_sample("mmqa_three_table.jsonl", &["--limit", "4", "--max-tokens", "24", "--table-tokens", "400"], &out);
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
    assert_eq!(v["setup"]["eval_args"][0], "--prompt-format", "{}", v["setup"]);
    assert_eq!(
        v["setup"]["prompts"]["whole_tables"].as_u64().unwrap()
            + v["setup"]["prompts"]["part_tables"].as_u64().unwrap(),
        4
    );
}

/// A prompt that cannot fit the model's context is that question's failure
/// alone: counted in `n` as wrong and in `not_run`, named in the
/// predictions, and the evaluation completes.
#[test]
fn over_long_prompts_count_as_wrong_and_never_abort_an_evaluation() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("eval.json");
    // SmolLM2's context is 8,192 tokens: 8,150 new tokens leave no room for
    // a prompt with tables of more than a few dozen tokens.
    let o = eval_sample("mmqa_two_table.jsonl", &["--limit", "3", "--max-tokens", "8150"], &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!((v["n"].as_u64(), v["not_run"].as_u64(), v["em"].as_f64()), (Some(3), Some(3), Some(0.0)), "{v}");
    let preds = std::fs::read_to_string(out.with_file_name("predictions.jsonl")).unwrap();
    assert_eq!(preds.lines().count(), 3);
    for l in preds.lines() {
        let p: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(p["not_run"].as_str().unwrap().contains("exceeds the model's context"), "{p}");
        assert_eq!(p["em"], false);
    }
}

#[test]
fn a_small_pipeline_runs_resumes_and_redoes_from_a_stage() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("pipeline.toml");
    let run = dir.path().join("run");
    std::fs::write(
        &cfg,
        format!(
            "run_dir = {:?}\ndata = \"data/sample/mmqa/mmqa_two_table.jsonl\"\neval_fraction = 0.1\n\
             table_tokens = 500\ncross_db = [\"farm\"]\n\
             [[eval_sets]]\nname = \"three\"\ndata = \"data/sample/mmqa/mmqa_three_table.jsonl\"\nmin_tables = 3\n\
             [traces]\ngenerators = [\"program\"]\n[pairs]\npolicy = \"homogeneous\"\n\
             [train]\nmethods = [\"sft-qa\"]\nmax_steps = 1\nmax_length = 768\n[eval]\nlimit = 3\nmax_tokens = 16\n",
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
        "base/cross_db/eval.json",
        "sft-qa/three/predictions.jsonl",
        "eval_sets/unseen_sql.txt",
        "report.md",
        "summary.json",
        "accuracy.png",
    ] {
        assert!(run.join(f).is_file(), "{f} is missing");
    }
    // The held-out database's questions are out of training entirely.
    let split: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("split.json")).unwrap()).unwrap();
    assert_eq!(split["cross_db_databases"], serde_json::json!(["farm"]), "{split}");
    let cross = std::fs::read_to_string(run.join("eval_sets/cross_db.txt")).unwrap();
    let train = std::fs::read_to_string(run.join("train_ids.txt")).unwrap();
    assert!(!cross.is_empty() && cross.lines().all(|id| !train.lines().any(|t| t == id)));
    assert_eq!(cross.lines().count() as u64, split["cross_db"].as_u64().unwrap());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let arm = &summary["arms"]["sft-qa"];
    for k in
        ["em", "em_unseen_sql", "em_cross_db", "em_three", "n", "n_unseen_sql", "n_cross_db", "adapter", "eval_args"]
    {
        assert!(arm.get(k).is_some(), "summary.json's sft-qa lacks {k}: {summary}");
    }
    assert!(summary["arms"]["base"].get("adapter").is_none());
    assert!(arm["compute"]["train_seconds"].as_f64().unwrap() > 0.0, "{summary}");
    assert!(summary["arms"]["base"]["compute"]["eval_seconds"].as_f64().unwrap() > 0.0, "{summary}");
    assert!(
        summary["arms"]["base"]["compute"].get("train_seconds").is_none(),
        "the base arm trains nothing: {summary}"
    );
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(report.contains("difference from sft-qa") && report.contains("Δ unseen_sql [95% CI]"), "{report}");
    // A second run skips every finished stage.
    let o = tabletrace(&["run", cfg.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("== train"), "{}", stderr(&o));
    // --from eval redoes evaluation only.
    let o = tabletrace(&["run", cfg.to_str().unwrap(), "--from", "eval", "--quiet", "--to", "eval"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("== eval: base") && !stderr(&o).contains("== train"), "{}", stderr(&o));
    assert!(stderr(&o).contains("stopped after eval"), "{}", stderr(&o));
    // --arm limits training and evaluation to the arms named and stops before the report.
    let o = tabletrace(&["run", cfg.to_str().unwrap(), "--from", "eval", "--quiet", "--arm", "sft-qa"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("== eval: sft-qa") && !err.contains("== eval: base"), "{err}");
    assert!(err.contains("stopped before the report (--arm)") && !err.contains("== report"), "{err}");
    assert!(run.join(".eval-sft-qa-three.done").is_file() && !run.join(".eval-base.done").exists());
    // --plan reads the markers: what is done, what a run would do, and with which command.
    let o = tabletrace(&["run", cfg.to_str().unwrap(), "--plan"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let plan = stdout(&o);
    let state = |key: &str| {
        let line = plan.lines().find(|l| l.split_whitespace().next() == Some(key)).unwrap_or_else(|| panic!("{plan}"));
        line.split_whitespace().nth(2).unwrap().to_string()
    };
    assert_eq!(state("train-sft-qa"), "done", "{plan}");
    assert_eq!(state("eval-sft-qa-three"), "done", "{plan}");
    assert_eq!(state("eval-base"), "pending", "{plan}");
    assert!(plan.contains("tabletrace eval --model smollm2-135m --data"), "{plan}");
    assert!(!run.join(".eval-base.done").exists(), "--plan runs nothing");
    let o = tabletrace(&["run", cfg.to_str().unwrap(), "--quiet", "--arm", "cpo"]);
    assert!(
        !o.status.success() && stderr(&o).contains("--arm cpo: not an arm of this config (its arms: base, sft-qa)")
    );
    // Changed training settings retrain from scratch: the finished
    // checkpoints of the old settings are not resumed.
    let text = std::fs::read_to_string(&cfg).unwrap().replace("max_steps = 1", "max_steps = 2");
    std::fs::write(&cfg, text).unwrap();
    let o = tabletrace(&["run", cfg.to_str().unwrap(), "--quiet", "--to", "train"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("training of other settings: starting afresh"), "{}", stderr(&o));
    let metrics = std::fs::read_to_string(run.join("sft-qa/metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("step")?.as_u64())
        .collect();
    assert_eq!(steps.last(), Some(&2), "{metrics}");
}

#[test]
fn pipeline_config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("pipeline.toml");
    std::fs::write(&cfg, "[train]\nmethods = [\"kto\"]\n").unwrap();
    let o = tabletrace(&["run", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    // Methods are the trainer's own type: the TOML error points at the line and lists the methods.
    assert!(
        stderr(&o).contains("methods = [\"kto\"]") && stderr(&o).contains("expected one of `cpo`, `simpo`"),
        "{}",
        stderr(&o)
    );
    std::fs::write(&cfg, "[trace]\ngenerators = []\n").unwrap();
    let o = tabletrace(&["run", cfg.to_str().unwrap()]);
    assert!(stderr(&o).contains("trace"), "{}", stderr(&o));
}

/// An id asked for that the data does not hold is counted as wrong and
/// named, not dropped from `n`.
#[test]
fn ids_that_do_not_load_count_as_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids.txt");
    std::fs::write(&ids, "mmqa_two_table:0\nmmqa_two_table:999999\n").unwrap();
    let out = dir.path().join("eval.json");
    let o = eval_sample("mmqa_two_table.jsonl", &["--ids", ids.to_str().unwrap(), "--max-tokens", "4"], &out);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("question mmqa_two_table:999999: not asked"), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!((v["n"].as_u64(), v["not_run"].as_u64()), (Some(2), Some(1)), "{v}");
}

/// `[traces] on_policy` samples the local model with the training prompt;
/// the samples are sorted by their own answers and paired heterogeneously.
#[test]
fn on_policy_samples_reach_the_pairs_stage() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("pipeline.toml");
    let run = dir.path().join("run");
    std::fs::write(
        &cfg,
        format!(
            "run_dir = {:?}\ndata = \"data/sample/mmqa/mmqa_two_table.jsonl\"\neval_fraction = 0.1\ntable_tokens = 500\n\
             [traces]\ngenerators = [\"program\", \"local:smollm2-135m\"]\nllm_questions = 2\non_policy = 3\nmax_tokens = 48\n\
             quantized = true\n[train]\nmethods = [\"cpo\"]\nmax_steps = 1\n",
            run.to_str().unwrap()
        ),
    )
    .unwrap();
    let o = tabletrace(&["run", cfg.to_str().unwrap(), "--to", "pairs", "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let sampled: Vec<serde_json::Value> = std::fs::read_to_string(run.join("traces/traces-1.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(sampled.len(), 6, "3 samples of each of 2 questions");
    assert!(sampled
        .iter()
        .all(|t| t["params"]["on_policy"] == true && t["generator"] == "local:smollm2-135m+quantized"));
    assert!(run.join("pairs/pairs.jsonl").is_file());
}
