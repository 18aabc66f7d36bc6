//! `tabletrace train` and `tabletrace pairs score` on SmolLM2-135M: a config
//! with a flag on top, the run directory, and scoring with the adapter.

use crate::{root, stderr, stdout, tabletrace};

/// Two short pairs (the trainer's TRL fixture rows).
fn pairs(dir: &std::path::Path) -> std::path::PathBuf {
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("crates/train/tests/data/trl_fixture.json")).unwrap(),
    )
    .unwrap();
    let p = dir.join("pairs.jsonl");
    let lines: Vec<String> = meta["rows"].as_array().unwrap().iter().map(|r| r.to_string()).collect();
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

#[test]
fn train_writes_the_run_directory_and_pairs_score_uses_the_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = pairs(dir.path());
    let out = dir.path().join("run");
    let toml = dir.path().join("train.toml");
    std::fs::write(
        &toml,
        format!(
            "method = \"cpo\"\ntrain = {:?}\noutput_dir = {:?}\nmax_steps = 5\nbatch_size = 2\nmax_length = 256\n\
             [lora]\nr = 4\ndropout = 0.0\n[optim]\nlr = 1e-3\n",
            pairs.to_str().unwrap(),
            out.to_str().unwrap()
        ),
    )
    .unwrap();
    // A flag overrides the TOML.
    let o = tabletrace(&["train", "--config", toml.to_str().unwrap(), "--max-steps", "2", "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("stdout is the JSON summary");
    assert_eq!(summary["steps"], 2);
    for f in [
        "train_config.json",
        "metrics.jsonl",
        "curves.png",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "tokenize_report.json",
    ] {
        assert!(out.join(f).is_file(), "{f} is missing");
    }
    let resolved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train_config.json")).unwrap()).unwrap();
    assert_eq!(resolved["max_steps"], 2);
    assert_eq!(resolved["lora"]["r"], 4);

    let score = |adapter: Option<&str>| {
        let mut args = vec!["pairs", "score", "--model", "smollm2-135m", "--pairs", pairs.to_str().unwrap(), "--json"];
        if let Some(a) = adapter {
            args.extend(["--adapter", a]);
        }
        let o = tabletrace(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap()
    };
    let base = score(None);
    let tuned = score(Some(out.join("adapter").to_str().unwrap()));
    assert_eq!(base["pairs"].as_array().unwrap().len(), 2);
    for k in ["loss", "rewards/margins", "logps/chosen", "nll_loss"] {
        assert!(base["metrics"][k].is_number(), "no {k}");
    }
    // Training moved the model: the chosen traces got likelier.
    let lc = |v: &serde_json::Value| v["metrics"]["logps/chosen"].as_f64().unwrap();
    assert!(lc(&tuned) > lc(&base), "base {}, tuned {}", lc(&base), lc(&tuned));
}

#[test]
fn a_bad_config_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("train.toml");
    std::fs::write(&toml, "train = \"p.jsonl\"\noutput_dir = \"o\"\nlearning_rate = 1.0\n").unwrap();
    let o = tabletrace(&["train", "--config", toml.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("learning_rate"), "{}", stderr(&o));
}

#[test]
fn merged_export_loads_as_a_hugging_face_folder_and_answers_like_the_adapter() {
    let dir = tempfile::tempdir().unwrap();
    // A fresh adapter with non-zero B (trained one step), then merged.
    let pairs = pairs(dir.path());
    let out = dir.path().join("run");
    let o = tabletrace(&[
        "train",
        "--train",
        pairs.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--max-length",
        "256",
        "--lr",
        "5e-3",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let merged = dir.path().join("merged");
    let adapter = out.join("adapter");
    let o = tabletrace(&[
        "adapter",
        "merge",
        "--model",
        "smollm2-135m",
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert!(merged.join(f).is_file(), "{f} is missing");
    }
    let score = |args: &[&str]| {
        let mut all = vec!["pairs", "score", "--pairs", pairs.to_str().unwrap(), "--json"];
        all.extend_from_slice(args);
        let o = tabletrace(&all);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap()["metrics"]["logps/chosen"].as_f64().unwrap()
    };
    let with_adapter = score(&["--model", "smollm2-135m", "--adapter", adapter.to_str().unwrap()]);
    let from_folder = score(&["--model", merged.to_str().unwrap()]);
    let base = score(&["--model", "smollm2-135m"]);
    assert!(
        (with_adapter - from_folder).abs() < 1e-3 * with_adapter.abs(),
        "adapter {with_adapter}, merged folder {from_folder}"
    );
    assert!((with_adapter - base).abs() > 1e-3, "training changed nothing");
    // An f16 copy of the adapter is half the size and scores within f16 rounding.
    let half = dir.path().join("adapter-f16");
    let o =
        tabletrace(&["adapter", "cast", adapter.to_str().unwrap(), "--dtype", "f16", "--out", half.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let size = |d: &std::path::Path| std::fs::metadata(d.join("adapter_model.safetensors")).unwrap().len() as f64;
    assert!((size(&half) / size(&adapter) - 0.5).abs() < 0.01, "{} vs {}", size(&half), size(&adapter));
    let with_half = score(&["--model", "smollm2-135m", "--adapter", half.to_str().unwrap()]);
    assert!((with_half - with_adapter).abs() < 1e-3 * with_adapter.abs(), "f16 {with_half}, f32 {with_adapter}");
}
