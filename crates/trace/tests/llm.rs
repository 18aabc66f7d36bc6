//! The embedded-model generator: every request gives a recorded trace, every
//! call is cached, and a second run repeats no call.

use std::path::PathBuf;

use tabletrace_data::Question;
use tabletrace_data::{load, LoadOptions, Polarity, Silent};
use tabletrace_model::load_model;
use tabletrace_trace::{llm_traces, CallCache, HttpLlm, HttpOptions, LlmRunOptions, LocalLlm, Wanted};

fn smollm2() -> LocalLlm {
    let model = tabletrace_model::cache_dir().join("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "{} is missing: run scripts/fetch-models.sh", model.display());
    LocalLlm {
        model: load_model(model.to_str().unwrap(), &Default::default()).unwrap(),
        name: "smollm2-135m".into(),
        batch: 4,
    }
}

fn sample(n: usize) -> Vec<Question> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut qs = load(&root.join("data/sample/mmqa/mmqa_two_table.jsonl"), &LoadOptions::default()).unwrap().questions;
    qs.truncate(n);
    qs
}

fn run_options(wanted: Wanted, max_tokens: usize) -> LlmRunOptions {
    LlmRunOptions {
        wanted,
        on_policy: 0,
        temperature_positive: 0.0,
        temperature_negative: 0.7,
        top_p: 0.95,
        max_tokens,
        seed: 1,
        chunk: 4,
        prompter: tabletrace_trace::Prompter {
            budget: tabletrace_data::Budget { max_rows_per_table: Some(5), max_tokens: Some(3000) },
            ..Default::default()
        },
    }
}

#[test]
fn local_generator_records_caches_and_resumes() {
    let qs = sample(2);
    let llm = smollm2();
    let dir = tempfile::tempdir().unwrap();
    let cache = CallCache::open(&dir.path().join("cache.sqlite")).unwrap();
    let opts = run_options(Wanted { positive: true, negatives: 1 }, 12);
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

#[test]
fn a_prompt_too_long_for_the_context_fails_its_question_alone() {
    let mut qs = sample(3);
    // The middle question's prompt is far beyond SmolLM2's 8,192-token context.
    qs[1].text = format!("{} Which one?", "Which department is the largest of all? ".repeat(1200));
    let dir = tempfile::tempdir().unwrap();
    let cache = CallCache::open(&dir.path().join("cache.sqlite")).unwrap();
    let opts = run_options(Wanted { positive: true, negatives: 0 }, 4);
    let (traces, stats) = llm_traces(&qs, &smollm2(), &cache, &opts, &Silent).unwrap();
    assert_eq!((stats.requests, stats.not_run, stats.failed), (3, 1, 0));
    assert_eq!(traces.len(), 3);
    let long = &traces[1];
    assert_eq!(long.question_id, qs[1].id.0);
    let why = long.invalid_reason.as_deref().unwrap();
    assert!(why.starts_with("not run: a prompt of") && why.contains("exceeds the model's context"), "{why}");
    for t in [&traces[0], &traces[2]] {
        assert!(!t.text.is_empty(), "{}: {:?}", t.question_id, t.invalid_reason);
        assert!(!t.invalid_reason.as_deref().unwrap_or("").contains("tokens"), "{:?}", t.invalid_reason);
    }
    assert_eq!(cache.len(), 2, "the long prompt is not cached: it was never asked");
}

#[test]
fn a_generator_whose_calls_all_fail_is_an_error_naming_the_cause() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port(); // closed
    let llm = HttpLlm::new(
        vec![format!("http://127.0.0.1:{port}")],
        "m".into(),
        HttpOptions { retries: 0, api_key_env: None, ..HttpOptions::default() },
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = CallCache::open(&dir.path().join("cache.sqlite")).unwrap();
    let e = llm_traces(&sample(2), &llm, &cache, &run_options(Wanted { positive: true, negatives: 1 }, 8), &Silent)
        .unwrap_err()
        .to_string();
    assert!(e.contains("http:m: all 4 calls failed") && e.contains(&format!("127.0.0.1:{port}")), "{e}");
}

#[test]
fn on_policy_samples_are_sorted_by_their_own_answers() {
    let qs = sample(2);
    let dir = tempfile::tempdir().unwrap();
    let cache = CallCache::open(&dir.path().join("cache.sqlite")).unwrap();
    let opts = LlmRunOptions { on_policy: 3, ..run_options(Wanted { positive: true, negatives: 2 }, 24) };
    let (traces, stats) = llm_traces(&qs, &smollm2(), &cache, &opts, &Silent).unwrap();
    assert_eq!(stats.requests, 6, "3 samples per question, no prompted positives or negatives");
    assert_eq!(traces.len(), 6);
    for t in &traces {
        assert_eq!(t.params["on_policy"], true);
        // The training prompt itself: no request for a mistake.
        assert!(t.prompt.contains("Question:") && !t.prompt.contains("one subtle mistake"), "{}", t.prompt);
        assert!(t.error_type.is_none());
        // A positive is a sample that reached gold; anything else is a negative.
        let reached_gold = t.polarity == Polarity::Positive;
        assert!(!reached_gold || t.valid, "a positive sample is valid by construction");
        if t.polarity == Polarity::Negative && !t.valid {
            assert!(t.invalid_reason.is_some());
        }
    }
    // Samples of one question differ by their seed.
    let seeds: std::collections::HashSet<String> =
        traces.iter().map(|t| t.params["sampling"]["seed"].to_string()).collect();
    assert_eq!(seeds.len(), 6);
}

#[test]
fn a_question_that_cannot_be_asked_is_named_not_dropped() {
    let mut qs = sample(2);
    qs[1].gold.clear();
    qs[1].gold_sql = Some("SELECT no_such_column FROM no_such_table".into());
    let dir = tempfile::tempdir().unwrap();
    let cache = CallCache::open(&dir.path().join("cache.sqlite")).unwrap();
    let (_, stats) =
        llm_traces(&qs, &smollm2(), &cache, &run_options(Wanted { positive: true, negatives: 0 }, 4), &Silent).unwrap();
    assert_eq!(stats.requests, 1);
    assert_eq!(stats.skipped.len(), 1, "{:?}", stats.skipped);
    assert!(stats.skipped[0].starts_with(&format!("{}: no gold answer", qs[1].id)), "{:?}", stats.skipped);
}

/// Records the prompts of each `complete` call and answers "Final answer: none".
struct Recorder(std::sync::Mutex<Vec<Vec<String>>>);

impl tabletrace_trace::Llm for Recorder {
    fn backend(&self) -> &str {
        "test"
    }
    fn model(&self) -> &str {
        "recorder"
    }
    fn complete(
        &self,
        prompts: &[String],
        _params: &[tabletrace_trace::LlmParams],
        done: &tabletrace_trace::Done<'_>,
    ) -> Vec<Result<String, String>> {
        self.0.lock().unwrap().push(prompts.to_vec());
        let out: Vec<Result<String, String>> = prompts.iter().map(|_| Ok("Final answer: none".to_string())).collect();
        for (i, r) in out.iter().enumerate() {
            done(i, r);
        }
        out
    }
}

#[test]
fn prompts_are_asked_longest_first_with_each_prompts_samples_together() {
    let qs = sample(6);
    let dir = tempfile::tempdir().unwrap();
    let cache = CallCache::open(&dir.path().join("cache.sqlite")).unwrap();
    let opts = LlmRunOptions { on_policy: 3, chunk: 4, ..run_options(Wanted { positive: true, negatives: 0 }, 8) };
    let llm = Recorder(Default::default());
    let (traces, stats) = llm_traces(&qs, &llm, &cache, &opts, &Silent).unwrap();
    assert_eq!(stats.requests, 18);
    let calls = llm.0.into_inner().unwrap();
    assert_eq!(calls.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 4, 4, 2], "chunks of 4 requests");
    let asked: Vec<&String> = calls.iter().flatten().collect();
    assert!(asked.windows(2).all(|w| w[0].len() >= w[1].len()), "not longest first");
    let lengths: std::collections::HashSet<usize> = asked.iter().map(|p| p.len()).collect();
    assert!(lengths.len() > 1, "the sample's prompts should differ in length for this test to mean anything");
    // The samples of one prompt are asked one after another.
    let mut runs = asked.clone();
    runs.dedup();
    assert_eq!(runs.len(), 6, "each prompt's 3 samples asked together");
    // The traces keep the questions' order, whatever order they were asked in.
    let ids: Vec<&str> = traces.iter().map(|t| t.question_id.as_str()).collect();
    let expected: Vec<&str> = qs.iter().flat_map(|q| std::iter::repeat_n(q.id.0.as_str(), 3)).collect();
    assert_eq!(ids, expected);
}
