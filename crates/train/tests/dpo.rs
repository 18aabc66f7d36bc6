//! DPO exact against TRL 1.16's `DPOTrainer`: tests/data/dpo_fixture.json and
//! dpo_grads.safetensors were written by tools/reference/dpo_fixture.py on
//! SmolLM2-135M with the CPO fixture's rows and adapter; the reference is the
//! base model (TRL: PEFT's adapter disabled). Then the loop: the reference's
//! log-probs are computed once per pair and reused by a resumed run.

use std::path::Path;

use candle_core::Device;
use serde_json::Value;
use tabletrace_data::Silent;
use tabletrace_model::Adapter;
use tabletrace_train::examples::{batch_sequences, parse_row, tokenize_dpo, Example, Row};
use tabletrace_train::objective::{dpo_loss, score};
use tabletrace_train::{LossConfig, LossType, Method, TrainConfig, Trainer};

use crate::trl::{check_grads, close, data, fixture_lora, ids};
use crate::util::smollm2;

fn fixture() -> Value {
    serde_json::from_str(&std::fs::read_to_string(data("dpo_fixture.json")).unwrap()).unwrap()
}

fn rows(meta: &Value, key: &str) -> Vec<Row> {
    let tok = &smollm2().tokenizer;
    meta[key].as_array().unwrap().iter().enumerate().map(|(i, v)| parse_row(v, i + 1, tok).unwrap()).collect()
}

#[test]
fn dpo_tokenisation_matches_trl_for_standard_and_conversational_rows() {
    let meta = fixture();
    let tok = &smollm2().tokenizer;
    for (rows_key, fmt) in [("rows", "standard"), ("conversational_rows", "conversational")] {
        let (ex, report) = tokenize_dpo(&rows(&meta, rows_key), tok, 512).unwrap();
        assert_eq!(report.kept, 2);
        for (e, want) in ex.iter().zip(meta[format!("tokenized_{fmt}")].as_array().unwrap()) {
            let Example::Preference { chosen, rejected, .. } = e else { panic!("pairs") };
            let prompt = ids(&want["prompt_ids"]);
            for (seq, side) in [(chosen, "chosen"), (rejected, "rejected")] {
                let whole: Vec<u32> = prompt.iter().copied().chain(ids(&want[format!("{side}_ids")])).collect();
                assert_eq!(seq.ids, whole, "{fmt} {side}: ids differ from TRL's");
                assert_eq!(seq.completion_start, prompt.len(), "{fmt} {side}: the completion starts elsewhere");
            }
        }
    }
    // A prompt that alone fills max_length is skipped with its reason.
    let (ex, report) = tokenize_dpo(&rows(&meta, "rows"), tok, 50).unwrap();
    assert!(ex.is_empty() && report.skipped.len() == 2, "{report:?}");
    assert!(report.skipped[0].1.contains("the prompt alone has"), "{report:?}");
}

#[test]
fn dpo_losses_metrics_reference_logps_and_gradients_match_trl() {
    let meta = fixture();
    let m = smollm2();
    let trl = candle_core::safetensors::load(data("dpo_grads.safetensors"), &Device::Cpu).unwrap();
    let lora = fixture_lora(&meta);
    let (ex, _) = tokenize_dpo(&rows(&meta, "rows"), &m.tokenizer, 512).unwrap();
    let seqs = batch_sequences(&ex.iter().collect::<Vec<_>>());
    let pad = m.tokenizer.pad_id();
    let vocab = m.model.config().vocab_size;
    // The reference: the base model without the adapter.
    let reference: Vec<f64> = score(&m.model, None, &seqs, true, pad, 64)
        .unwrap()
        .logp_sums
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    let refs: Vec<(f64, f64)> = (0..2).map(|i| (reference[i], reference[2 + i])).collect();
    for case in meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        for (i, (c, r)) in refs.iter().enumerate() {
            close(&format!("{name}: reference chosen logp {i}"), *c, case["ref_chosen_logps"][i].as_f64().unwrap());
            close(&format!("{name}: reference rejected logp {i}"), *r, case["ref_rejected_logps"][i].as_f64().unwrap());
        }
        let params = LossConfig {
            loss_type: LossType::parse(case["loss_type"].as_str().unwrap()),
            beta: case["beta"].as_f64(),
            label_smoothing: case["label_smoothing"].as_f64().unwrap_or(0.0),
            ..Default::default()
        }
        .resolve(Method::Dpo);
        let adapter: &dyn Adapter = &lora;
        let scored = score(&m.model, Some(adapter), &seqs, true, pad, 37).unwrap();
        let (loss, sums) = dpo_loss(&scored, &refs, &params, 2, vocab).unwrap();
        close(&format!("{name}: loss"), sums.loss, case["loss"].as_f64().unwrap());
        let ours: std::collections::HashMap<_, _> = sums.to_metrics(true, params.cpo_alpha).into_iter().collect();
        let logged = case["metrics"].as_object().unwrap();
        assert_eq!(logged.len(), 8, "rewards ×4, logps ×2, logits ×2");
        for (k, want) in logged {
            let got = *ours.get(k.as_str()).unwrap_or_else(|| panic!("we log no {k}"));
            let want = want.as_f64().unwrap();
            if k.starts_with("rewards/") && k != "rewards/accuracies" {
                // β × a difference of two f32 sums of ~-100 nats: its error is
                // measured in nats of log-prob (here 6e-5 for rewards/chosen).
                let nats = (got - want).abs() / params.beta;
                assert!(nats <= 5e-4, "{name}: {k}: ours {got}, TRL {want} ({nats:.1e} nats apart)");
            } else {
                close(&format!("{name}: {k}"), got, want);
            }
        }
        let grads = loss.backward().unwrap();
        check_grads(name, &lora, &grads, &trl, case["grad_norm"].as_f64().unwrap());
    }
}

/// The loop tests' config (the same two rows), for DPO: one pair a step.
fn dpo_config(dir: &Path) -> TrainConfig {
    let mut c = crate::training::config(dir, "dpo");
    c.method = Method::Dpo;
    c.batch_size = 1;
    c.optim.lr = 5e-3;
    c
}

fn metric(out: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap().get(key).and_then(Value::as_f64))
        .collect()
}

fn cached_lines(out: &Path) -> usize {
    std::fs::read_to_string(out.join("reference_logps.jsonl")).unwrap().lines().count()
}

#[test]
fn dpo_trains_from_the_base_as_reference_and_computes_its_logps_once() {
    let dir = tempfile::tempdir().unwrap();
    let c = dpo_config(dir.path());
    Trainer::new(c.clone(), smollm2(), &Silent).unwrap().run().unwrap();
    let losses = metric(&c.output_dir, "loss");
    assert_eq!(losses.len(), 4);
    // A fresh adapter (B = 0) is the reference itself: Δ = 0, loss log 2.
    assert!((losses[0] - std::f64::consts::LN_2).abs() < 1e-5, "{losses:?}");
    assert_eq!(metric(&c.output_dir, "rewards/margins")[0], 0.0);
    // Steps 3–4 see the two pairs again (one pair a step): the policy has moved away from the reference.
    let margins = metric(&c.output_dir, "rewards/margins");
    assert!(margins[2] > 0.0 && margins[3] > 0.0 && losses[3] < losses[0], "{losses:?} {margins:?}");
    assert_eq!(cached_lines(&c.output_dir), 3, "a header and one line per pair");

    // Resumed after a crash: the same losses, the reference's log-probs read back, not recomputed.
    std::fs::remove_dir_all(c.output_dir.join("checkpoints/step-4")).unwrap();
    let s = Trainer::new(c.clone(), smollm2(), &Silent).unwrap().run().unwrap();
    assert_eq!(s.resumed_from, 2);
    for (a, b) in losses.iter().zip(metric(&c.output_dir, "loss")) {
        assert!((a - b).abs() <= 1e-6, "uninterrupted {losses:?}, resumed {b}");
    }
    assert_eq!(cached_lines(&c.output_dir), 3);
    // Other settings start the cache afresh.
    let reference =
        tabletrace_train::reference::Reference::open(&c.output_dir, "other", None, &smollm2().model).unwrap();
    assert_eq!(reference.cached(), 0);
}

#[test]
fn dpo_from_an_adapter_takes_that_adapter_as_its_reference() {
    let dir = tempfile::tempdir().unwrap();
    let mut sft = dpo_config(dir.path());
    sft.method = Method::SftTrace;
    sft.output_dir = dir.path().join("sft");
    sft.max_steps = 2;
    Trainer::new(sft.clone(), smollm2(), &Silent).unwrap().run().unwrap();
    let mut c = dpo_config(dir.path());
    c.init_adapter = Some(sft.output_dir.join("adapter"));
    c.max_steps = 1;
    Trainer::new(c.clone(), smollm2(), &Silent).unwrap().run().unwrap();
    // Policy and reference start equal: no margin, loss log 2.
    let loss = metric(&c.output_dir, "loss")[0];
    assert!((loss - std::f64::consts::LN_2).abs() < 1e-5, "{loss}");
    assert_eq!(metric(&c.output_dir, "rewards/chosen")[0], 0.0);
}
