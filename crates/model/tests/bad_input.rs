//! Bad weights, configs, tokenizers and requests give clear errors.

use std::path::PathBuf;

use candle_core::{DType, Device};
use tabletrace_model::{generate_tokens, load_model, read_gguf, read_hf_folder, GenerateOptions, LoadOptions, Model};

use crate::util::smollm2;

fn tiny(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn missing_model_says_how_to_get_it() {
    let e = load_model("/no/such/model.gguf", &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("/no/such/model.gguf") && e.contains("no such file"), "{e}");
    let e = load_model("someorg/somemodel", &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("someorg/somemodel") && e.contains("--local-dir"), "{e}");
}

#[test]
fn truncated_gguf_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(smollm2()).unwrap();
    for cut in [1_000usize, 20_000_000] {
        let p = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = read_gguf(&p, false).unwrap_err().to_string();
        assert!(e.contains(&format!("cut{cut}.gguf")), "{e}");
        assert!(e.contains("truncated") || e.contains("not a readable GGUF"), "{e}");
    }
}

#[test]
fn truncated_or_missing_safetensors_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny("tiny-qwen2"), dir.path());
    let st = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let e = read_hf_folder(dir.path(), DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
    std::fs::remove_file(&st).unwrap();
    let e = read_hf_folder(dir.path(), DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("model.safetensors") && e.contains("missing"), "{e}");
}

#[test]
fn unsupported_architecture_in_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny("tiny-qwen2"), dir.path());
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap().replace("\"qwen2\"", "\"gpt_neox\"");
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    let e = read_hf_folder(dir.path(), DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("\"gpt_neox\" is not supported"), "{e}");
}

#[test]
fn tokenizer_larger_than_the_embedding_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny("tiny-qwen2"), dir.path());
    // A word-level tokenizer with 200 tokens for a 128-row embedding.
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..200).map(|i| (format!("w{i}"), serde_json::json!(i))).collect();
    let tok = serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}});
    std::fs::write(dir.path().join("tokenizer.json"), tok.to_string()).unwrap();
    let e = load_model(dir.path().to_str().unwrap(), &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("200 tokens") && e.contains("128 rows"), "{e}");
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let ck = read_hf_folder(&tiny("tiny-qwen2"), DType::F32, &Device::Cpu).unwrap();
    let model = Model::new(ck, &Device::Cpu).unwrap();
    let prompt: Vec<u32> = (0..120).map(|i| i % 100).collect();
    let opts = GenerateOptions { max_new_tokens: 32, ..GenerateOptions::default() };
    let e = generate_tokens(&model, &[prompt], &opts, &[], 0, None).unwrap_err().to_string();
    assert!(e.contains("120 tokens plus 32 new tokens exceeds the model's context of 128"), "{e}");
    let e = generate_tokens(&model, &[vec![]], &opts, &[], 0, None).unwrap_err().to_string();
    assert!(e.contains("prompt 0 is empty"), "{e}");
}
