//! The embedded-model generator: every request gives a recorded trace, every
//! call is cached, and a second run repeats no call.

use std::path::PathBuf;

use tabletrace_data::{load, LoadOptions, Polarity, Silent};
use tabletrace_model::load_model;
use tabletrace_trace::{llm_traces, CallCache, LlmRunOptions, LocalLlm, Wanted};

#[test]
fn local_generator_records_caches_and_resumes() {
    let model = tabletrace_model::cache_dir().join("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "{} is missing: run scripts/fetch-models.sh", model.display());
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut qs = load(&root.join("data/sample/mmqa/mmqa_two_table.jsonl"), &LoadOptions::default()).unwrap().questions;
    qs.truncate(2);
    let llm = LocalLlm {
        model: load_model(model.to_str().unwrap(), &Default::default()).unwrap(),
        name: "smollm2-135m".into(),
        batch: 4,
    };
    let dir = tempfile::tempdir().unwrap();
    let cache = CallCache::open(&dir.path().join("cache.sqlite")).unwrap();
    let opts = LlmRunOptions {
        wanted: Wanted { positive: true, negatives: 1 },
        temperature_positive: 0.0,
        temperature_negative: 0.7,
        top_p: 0.95,
        max_tokens: 12,
        seed: 1,
        chunk: 4,
        prompter: tabletrace_trace::Prompter {
            budget: tabletrace_data::Budget { max_rows_per_table: Some(5), max_tokens: Some(3000) },
            ..Default::default()
        },
    };
    let (traces, stats) = llm_traces(&qs, &llm, &cache, &opts, &Silent).unwrap();
    assert_eq!(stats.requests, 4);
    assert_eq!(stats.cached, 0);
    assert_eq!(traces.len(), 4);
    assert_eq!(cache.len(), 4);
    for t in &traces {
        assert_eq!(t.generator, "local:smollm2-135m");
        assert!(t.prompt.contains("Question:") && t.prompt.contains("Final answer:"));
        assert!(t.valid || t.invalid_reason.is_some());
        assert!(!t.text.is_empty());
    }
    assert!(traces.iter().any(|t| t.polarity == Polarity::Negative && t.error_type.is_some()));
    assert!(traces
        .iter()
        .filter(|t| t.polarity == Polarity::Negative)
        .all(|t| t.prompt.contains("one subtle mistake")));
    // A second run is answered from the cache, with the same traces.
    let (again, stats) = llm_traces(&qs, &llm, &cache, &opts, &Silent).unwrap();
    assert_eq!(stats.cached, 4);
    assert_eq!(again, traces);
}
