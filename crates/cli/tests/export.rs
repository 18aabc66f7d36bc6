//! `tabletrace export trl`: a SmolLM2 CPO run handed to TRL. The folder's
//! files are checked always; where the TRL venv of scripts/setup-peers.sh
//! torch is present, the exported script trains two steps with `accelerate
//! launch` (one CPU process): its first loss equals ours, and its adapter
//! reads back into `tabletrace pairs score`.

use std::process::Command;

use serde_json::Value;

use crate::{root, stderr, tabletrace};

/// Four pairs: the trainer's two TRL fixture rows, each twice with an id.
fn pairs(dir: &std::path::Path) -> std::path::PathBuf {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("crates/train/tests/data/trl_fixture.json")).unwrap(),
    )
    .unwrap();
    let p = dir.join("pairs.jsonl");
    let mut lines = Vec::new();
    for k in 0..2 {
        for (i, r) in meta["rows"].as_array().unwrap().iter().enumerate() {
            let mut r = r.clone();
            r["id"] = format!("q{i}-{k}").into();
            lines.push(r.to_string());
        }
    }
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn metric_losses(path: &std::path::Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?.get(key)?.as_f64())
        .collect()
}

#[test]
fn a_cpo_run_exports_to_trl_with_its_order_and_settings() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = pairs(dir.path());
    let run = dir.path().join("run");
    let toml = dir.path().join("train.toml");
    std::fs::write(
        &toml,
        format!(
            "method = \"cpo\"\ntrain = {:?}\noutput_dir = {:?}\nmax_steps = 2\nbatch_size = 2\nmax_length = 256\n\
             [lora]\nr = 4\ndropout = 0.0\n[loss]\nbeta = 0.2\n[optim]\nlr = 1e-3\n",
            pairs.to_str().unwrap(),
            run.to_str().unwrap()
        ),
    )
    .unwrap();
    let o = tabletrace(&["train", "--config", toml.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let exp = dir.path().join("trl");
    let o = tabletrace(&["export", "trl", run.to_str().unwrap(), "--out", exp.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("4 rows for 2 steps of cpo (the same batches"), "{}", stderr(&o));
    for f in [
        "train.py",
        "README.md",
        "accelerate/cpu.yaml",
        "accelerate/zero2.yaml",
        "accelerate/zero3.yaml",
        "accelerate/fsdp.yaml",
        "accelerate/ddp.yaml",
    ] {
        assert!(exp.join(f).is_file(), "{f} is missing");
    }
    let s: Value = serde_json::from_str(&std::fs::read_to_string(exp.join("tabletrace_train.json")).unwrap()).unwrap();
    assert_eq!(s["method"], "cpo");
    assert_eq!(s["hf_model"], "HuggingFaceTB/SmolLM2-135M-Instruct");
    assert!(s["gguf"].as_str().unwrap().ends_with(".gguf"));
    assert_eq!(
        (s["loss"]["loss_type"].as_str(), s["loss"]["beta"].as_f64(), s["loss"]["cpo_alpha"].as_f64()),
        (Some("sigmoid"), Some(0.2), Some(1.0))
    );
    assert_eq!(
        (s["total_steps"].as_u64(), s["warmup_steps"].as_u64(), s["batch_size"].as_u64()),
        (Some(2), Some(1), Some(2))
    );
    assert_eq!(s["optim"]["lr"], 1e-3);
    assert_eq!(s["lora"]["target_modules"].as_array().unwrap().len(), 7);
    // Every row once, in a shuffled order: a permutation of the file's ids.
    let rows: Vec<Value> = std::fs::read_to_string(exp.join("train.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r.get("chosen").is_some() && r.get("rejected").is_some() && r.get("id").is_none()));
    let py = Command::new("python3").args(["-m", "py_compile"]).arg(exp.join("train.py")).output().unwrap();
    assert!(py.status.success(), "train.py does not compile: {}", String::from_utf8_lossy(&py.stderr));

    let accelerate = tabletrace_model::cache_dir().join("venv-torch/bin/accelerate");
    if !accelerate.is_file() {
        eprintln!("TRL run skipped: {} is missing (scripts/setup-peers.sh torch)", accelerate.display());
        return;
    }
    let o = Command::new(&accelerate)
        .args(["launch", "--config_file"])
        .arg(exp.join("accelerate/cpu.yaml"))
        .arg(exp.join("train.py"))
        // No hub here: the GGUF tabletrace trained on, dequantised by transformers.
        .args(["--model", s["gguf"].as_str().unwrap()])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "the exported script failed: {}", String::from_utf8_lossy(&o.stderr));
    let log: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(exp.join("out/log_history.json")).unwrap()).unwrap();
    let trl: Vec<f64> = log.iter().filter_map(|e| e.get("loss")?.as_f64()).collect();
    let ours = metric_losses(&run.join("metrics.jsonl"), "loss");
    assert_eq!(trl.len(), 2, "{log:?}");
    eprintln!("first-step loss: TRL {}, tabletrace {}", trl[0], ours[0]);
    // Step 1 starts from B = 0 on both sides: the same loss. (Step 2 differs:
    // the adapters' A matrices are drawn by different generators.)
    assert!((trl[0] - ours[0]).abs() <= 1e-4 * ours[0].abs(), "first loss: TRL {}, ours {}", trl[0], ours[0]);
    let adapter = exp.join("out/adapter");
    let o = tabletrace(&[
        "pairs",
        "score",
        "--model",
        "smollm2-135m",
        "--adapter",
        adapter.to_str().unwrap(),
        "--pairs",
        pairs.to_str().unwrap(),
        "--max-length",
        "256",
        "--json",
    ]);
    assert!(o.status.success(), "TRL's adapter does not read back: {}", stderr(&o));
}
