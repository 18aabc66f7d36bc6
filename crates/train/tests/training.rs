//! The loop on real weights (SmolLM2-135M): the loss drops, accumulation
//! equals one big batch, resume continues exactly, adapters round-trip in
//! PEFT format, and bad input is reported.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tabletrace_data::Silent;
use tabletrace_model::{read_hf_folder, Lora, Model};
use tabletrace_train::{Method, TrainConfig, Trainer};

use crate::util::smollm2;

/// Two short pairs (the TRL fixture's rows), written as pairs.jsonl.
fn pairs_file(dir: &Path) -> PathBuf {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/trl_fixture.json"))
            .unwrap(),
    )
    .unwrap();
    let path = dir.join("pairs.jsonl");
    let lines: Vec<String> = meta["rows"].as_array().unwrap().iter().map(|r| r.to_string()).collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

pub(crate) fn config(dir: &Path, out: &str) -> TrainConfig {
    let mut c = TrainConfig {
        train: pairs_file(dir),
        output_dir: dir.join(out),
        max_length: 256,
        batch_size: 2,
        max_steps: 4,
        save_every: 2,
        keep_checkpoints: 5,
        ..Default::default()
    };
    c.lora.r = 4;
    c.lora.dropout = 0.0;
    c.optim.lr = 2e-3;
    c.schedule.warmup_ratio = 0.0;
    c
}

fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn losses(out: &Path) -> Vec<f64> {
    metrics(out).iter().filter_map(|m| m.get("loss").and_then(Value::as_f64)).collect()
}

#[test]
fn cpo_and_sft_lower_the_loss_on_repeated_rows() {
    let dir = tempfile::tempdir().unwrap();
    for method in [Method::Cpo, Method::SftQa] {
        let mut c = config(dir.path(), method.name());
        c.method = method;
        c.max_steps = 6;
        let s = Trainer::new(c.clone(), smollm2(), &Silent).unwrap().run().unwrap();
        let l = losses(&c.output_dir);
        assert_eq!(l.len(), 6);
        assert!(l[5] < l[0], "{}: loss did not drop: {l:?}", method.name());
        assert!(s.adapter_dir.join("adapter_model.safetensors").is_file());
        assert!(c.output_dir.join("curves.png").is_file());
        let m = &metrics(&c.output_dir)[0];
        for k in ["loss", "nll_loss", "learning_rate", "grad_norm", "tokens_per_second"] {
            assert!(m.get(k).is_some(), "{}: metrics lack {k}", method.name());
        }
        if method == Method::Cpo {
            for k in [
                "rewards/chosen",
                "rewards/rejected",
                "rewards/accuracies",
                "rewards/margins",
                "logps/chosen",
                "logps/rejected",
                "logits/chosen",
                "logits/rejected",
            ] {
                assert!(m.get(k).is_some(), "metrics lack {k}");
            }
        }
    }
}

#[test]
fn accumulated_micro_batches_equal_one_big_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut big = config(dir.path(), "big");
    big.max_steps = 2;
    let mut small = config(dir.path(), "small");
    small.max_steps = 2;
    small.batch_size = 1;
    small.grad_accum = 2;
    Trainer::new(big.clone(), smollm2(), &Silent).unwrap().run().unwrap();
    Trainer::new(small.clone(), smollm2(), &Silent).unwrap().run().unwrap();
    let (a, b) = (metrics(&big.output_dir), metrics(&small.output_dir));
    for (x, y) in a.iter().zip(&b) {
        for k in ["loss", "grad_norm", "nll_loss", "rewards/margins"] {
            let (x, y) = (x[k].as_f64().unwrap(), y[k].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{k}: one batch {x}, accumulated {y}");
        }
    }
}

#[test]
fn resume_after_a_crash_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), "run");
    Trainer::new(c.clone(), smollm2(), &Silent).unwrap().run().unwrap();
    let full = losses(&c.output_dir);
    // As if killed after the step-2 checkpoint: later state is gone.
    std::fs::remove_dir_all(c.output_dir.join("checkpoints/step-4")).unwrap();
    std::fs::remove_dir_all(c.output_dir.join("adapter")).unwrap();
    let s = Trainer::new(c.clone(), smollm2(), &Silent).unwrap().run().unwrap();
    assert_eq!(s.resumed_from, 2);
    let resumed = losses(&c.output_dir);
    assert_eq!(resumed.len(), 4, "metric lines past the checkpoint are replaced, not duplicated");
    for (a, b) in full.iter().zip(&resumed) {
        assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "uninterrupted {full:?}, resumed {resumed:?}");
    }
    // Another config refuses the checkpoint.
    let mut other = c.clone();
    other.optim.lr = 1e-3;
    let e = Trainer::new(other, smollm2(), &Silent).unwrap().run().unwrap_err().to_string();
    assert!(e.contains("another config"), "{e}");
}

#[test]
fn adapters_round_trip_in_peft_format_and_refuse_another_base() {
    let dir = tempfile::tempdir().unwrap();
    let m = smollm2();
    let lora = Lora::new(&m.model, &tabletrace_model::LoraConfig::default(), 3).unwrap();
    lora.save(dir.path(), "smollm2-135m").unwrap();
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 16);
    let back = Lora::load(dir.path(), &m.model).unwrap();
    for ((n1, v1), (n2, v2)) in lora.named_vars().into_iter().zip(back.named_vars()) {
        assert_eq!(n1, n2);
        let d =
            (v1.as_tensor() - v2.as_tensor()).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "{n1} changed in the round trip");
    }
    assert!(lora.named_vars()[0].0.starts_with("base_model.model.model.layers.0.self_attn.q_proj.lora_A"));
    let tiny_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/data/tiny-qwen3");
    let tiny = Model::new(
        read_hf_folder(&tiny_dir, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let e = Lora::load(dir.path(), &tiny).unwrap_err().to_string();
    assert!(e.contains("another base model"), "{e}");
}

#[test]
fn bad_rows_are_reported_with_file_and_line_or_skipped_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"a\", \"chosen\": \n",
    )
    .unwrap();
    let mut c = config(dir.path(), "bad");
    c.train = bad.clone();
    let e = Trainer::new(c, smollm2(), &Silent).err().unwrap().to_string();
    assert!(e.contains("bad.jsonl:2"), "{e}");

    let long = dir.path().join("long.jsonl");
    let prompt = "word ".repeat(400);
    std::fs::write(
        &long,
        format!(
            "{}\n{}\n",
            serde_json::json!({"prompt": prompt, "chosen": "x", "rejected": "y"}),
            serde_json::json!({"prompt": "q", "chosen": "", "rejected": "y", "metadata": {"question_id": "q:7"}})
        ),
    )
    .unwrap();
    let mut c = config(dir.path(), "long");
    c.train = long;
    let e = Trainer::new(c.clone(), smollm2(), &Silent).err().unwrap().to_string();
    assert!(e.contains("no training rows left") && e.contains("tokenize_report.json"), "{e}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(c.output_dir.join("tokenize_report.json")).unwrap()).unwrap();
    let reasons = report["skipped"].to_string();
    assert!(reasons.contains("the prompt alone has") && reasons.contains("empty chosen"), "{reasons}");
    // Each skipped row is named with its line: `line N`, or `ID (line N)`.
    assert!(reasons.contains("\"line 1\"") && reasons.contains("\"q:7 (line 2)\""), "{reasons}");
}

#[test]
fn a_warm_start_begins_from_the_given_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let mut sft = config(dir.path(), "sft");
    sft.method = Method::SftTrace;
    sft.max_steps = 2;
    Trainer::new(sft.clone(), smollm2(), &Silent).unwrap().run().unwrap();
    let adapter = sft.output_dir.join("adapter");

    let mut cpo = config(dir.path(), "cpo");
    cpo.init_adapter = Some(adapter.clone());
    let warm = Trainer::new(cpo.clone(), smollm2(), &Silent).unwrap();
    let saved = Lora::load(&adapter, &smollm2().model).unwrap();
    let saved: std::collections::HashMap<String, Vec<f32>> = saved
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    for (name, var) in warm.lora().named_vars() {
        assert_eq!(var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(), saved[&name], "{name}");
    }
    // A fresh init differs (B starts at zero; after training it does not).
    let fresh = Trainer::new(config(dir.path(), "fresh"), smollm2(), &Silent).unwrap();
    assert!(fresh
        .lora()
        .named_vars()
        .iter()
        .any(|(n, v)| { v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap() != saved[n] }));
    // Another rank is refused, naming the key.
    cpo.lora.r = 8;
    cpo.output_dir = dir.path().join("cpo8");
    let e = Trainer::new(cpo, smollm2(), &Silent).err().unwrap().to_string();
    assert!(e.contains("init_adapter") && e.contains(&adapter.display().to_string()), "{e}");
}

#[test]
fn a_stop_asked_before_the_first_step_ends_the_run_at_once() {
    // (A stop asked during training saves the steps done: crates/cli/tests/reliability.rs.)
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), "stop");
    let asked = std::sync::atomic::AtomicBool::new(true);
    let mut t = Trainer::new(c.clone(), smollm2(), &Silent).unwrap();
    t.stop_when(&asked);
    match t.run() {
        Err(tabletrace_train::Error::Stopped { step: 0, total: 4, .. }) => {}
        other => panic!("expected a stop at step 0 of 4, got {other:?}"),
    }
    assert!(!c.output_dir.join("checkpoints").exists(), "nothing to save before the first step");
    assert!(!c.output_dir.join("adapter").exists());
}
