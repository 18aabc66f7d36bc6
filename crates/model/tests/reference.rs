//! Against the golden fixture written by tools/reference/model_logits.py
//! (Hugging Face transformers, f32). If these fail after a change to the
//! fixture's inputs, regenerate it with that script.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;
use tabletrace_model::{
    generate, generate_tokens, load_model, read_hf_folder, ChatMessage, GenerateOptions, LoadOptions, Model,
};

use crate::util::smollm2;

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn fixture(dir: &Path, stem: &str) -> (Value, std::collections::HashMap<String, Tensor>) {
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{stem}.json"))).unwrap()).unwrap();
    let tensors = candle_core::safetensors::load(dir.join(format!("{stem}.safetensors")), &Device::Cpu).unwrap();
    (meta, tensors)
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn all_logits(model: &Model, ids: &[u32]) -> Tensor {
    let t = ids.len();
    let ids_t = Tensor::from_vec(ids.to_vec(), (1, t), &Device::Cpu).unwrap();
    let pos = Tensor::from_vec((0..t as u32).collect::<Vec<_>>(), (1, t), &Device::Cpu).unwrap();
    model.forward(&ids_t, &pos, None, None, false).unwrap().squeeze(0).unwrap()
}

#[test]
fn smollm2_matches_transformers() {
    let m = load_model(smollm2().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let (meta, tensors) = fixture(&data(), "smollm2_reference");
    let columns =
        Tensor::from_vec(ids_of(&meta["columns"]), meta["columns"].as_array().unwrap().len(), &Device::Cpu).unwrap();
    for (i, p) in meta["prompts"].as_array().unwrap().iter().enumerate() {
        let text = p["text"].as_str().unwrap();
        let ids = ids_of(&p["ids"]);
        // The tokenizer rebuilt from GGUF metadata agrees with transformers'.
        assert_eq!(m.tokenizer.encode(text, false).unwrap(), ids, "prompt {i}: token ids");
        if p["chat"].as_bool().unwrap() {
            let user = meta["chat_user_message"].as_str().unwrap();
            let rendered = m.tokenizer.apply_chat_template(&[ChatMessage::new("user", user)], true).unwrap();
            assert_eq!(rendered, text, "chat template rendering");
        }
        let logits = all_logits(&m.model, &ids);
        let t = ids.len();
        let last = logits.get(t - 1).unwrap();
        let d_last = max_abs_diff(&last, &tensors[&format!("p{i}.last")]);
        let d_cols = max_abs_diff(&logits.index_select(&columns, 1).unwrap(), &tensors[&format!("p{i}.columns")]);
        assert!(d_last <= 1e-3 && d_cols <= 1e-3, "prompt {i}: max |Δlogit| last {d_last}, columns {d_cols}");
        let opts = GenerateOptions { max_new_tokens: 32, ignore_eos: true, ..GenerateOptions::default() };
        let out = generate(&m.model, &m.tokenizer, std::slice::from_ref(&ids), &opts).unwrap();
        assert_eq!(out[0].tokens, ids_of(&p["greedy"]), "prompt {i}: greedy tokens");
    }
}

fn tiny_model_matches(name: &str) {
    let dir = data().join(name);
    let ck = read_hf_folder(&dir, candle_core::DType::F32, &Device::Cpu).unwrap();
    let model = Model::new(ck, &Device::Cpu).unwrap();
    let (meta, tensors) = fixture(&dir, "reference");
    let rows: Vec<Vec<u32>> = meta["ids"].as_array().unwrap().iter().map(ids_of).collect();
    for (i, ids) in rows.iter().enumerate() {
        let d = max_abs_diff(&all_logits(&model, ids), &tensors[&format!("r{i}.logits")]);
        assert!(d <= 1e-3, "{name} row {i}: max |Δlogit| {d}");
    }
    // Both rows in one left-padded batch give each row's reference continuation.
    let opts = GenerateOptions { max_new_tokens: 32, ignore_eos: true, ..GenerateOptions::default() };
    let out = generate_tokens(&model, &rows, &opts, &[], 0, None).unwrap();
    for (i, (tokens, _)) in out.iter().enumerate() {
        assert_eq!(tokens, &ids_of(&meta["greedy"][i]), "{name} row {i}: greedy tokens in a padded batch");
    }
}

#[test]
fn tiny_qwen2_matches_transformers() {
    tiny_model_matches("tiny-qwen2");
}

#[test]
fn tiny_qwen3_matches_transformers() {
    tiny_model_matches("tiny-qwen3");
}
