//! LLM trace generators: the prompts, the [`Llm`] backends (the embedded
//! model today), and turning completions into validated [`Trace`]s, every
//! call going through the [`CallCache`].

use std::collections::HashMap;

use tabletrace_data::matching::{normalize, split_values, Norm};
use tabletrace_data::{Answer, ErrorType, Polarity, Question, Reporter, TableDb, Trace};
use tabletrace_model::{generate, ChatMessage, GenerateOptions, LoadedModel, Sampling};

use crate::cache::{CallCache, CallKey};
use crate::error::Error;
use crate::generate::{gold_answer, question_evidence, Wanted};
use crate::program::{ProgramTracer, StepCache};
use crate::prompts::{PromptStyle, Prompter};
use crate::validate::{extract_final_answer, faithfulness, matches_gold, Evidence};

/// Sampling parameters of one request.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LlmParams {
    /// Temperature; 0 is greedy.
    pub temperature: f64,
    /// Nucleus threshold.
    pub top_p: f64,
    /// New tokens at most.
    pub max_tokens: usize,
    /// Sampling seed of this request.
    pub seed: u64,
}

impl LlmParams {
    /// The same temperature, top-p and length: requests that may share one
    /// batch (or one request with `n`), each with its own seed.
    pub fn same_but_seed(&self, other: &LlmParams) -> bool {
        (self.temperature, self.top_p, self.max_tokens) == (other.temperature, other.top_p, other.max_tokens)
    }
}

/// Called with a prompt's index and result as soon as it is answered.
pub type Done<'a> = dyn Fn(usize, &Result<String, String>) + Sync + 'a;

/// A text generator for trace prompts.
pub trait Llm {
    /// The backend (`local`, `http`).
    fn backend(&self) -> &str;
    /// The model's name.
    fn model(&self) -> &str;
    /// One completion per prompt (the user message), or the reason it
    /// failed. `done(i, result)` is called as soon as prompt `i` is answered
    /// (from any thread), so that callers can store it before the rest finish.
    fn complete(&self, prompts: &[String], params: &[LlmParams], done: &Done<'_>) -> Vec<Result<String, String>>;
    /// Whether a prompt and `max_tokens` new tokens fit the model's context,
    /// or why not. Checked before batching, so that a prompt that cannot fit
    /// is its own question's failure alone. Default: fits (a server that
    /// disagrees answers with an error for that request only).
    fn fits(&self, _prompt: &str, _max_tokens: usize) -> Result<(), String> {
        Ok(())
    }
}

/// The embedded model on tabletrace's runtime, generating in batches.
pub struct LocalLlm {
    /// The loaded model.
    pub model: LoadedModel,
    /// The spec it was loaded from (its name in traces).
    pub name: String,
    /// Prompts per batch.
    pub batch: usize,
}

impl Llm for LocalLlm {
    fn backend(&self) -> &str {
        "local"
    }

    fn model(&self) -> &str {
        &self.name
    }

    fn fits(&self, prompt: &str, max_tokens: usize) -> Result<(), String> {
        let ids = self.encode(prompt)?;
        let context = self.model.model.config().max_position_embeddings;
        if ids.len() + max_tokens > context {
            return Err(format!(
                "a prompt of {} tokens plus {max_tokens} new tokens exceeds the model's context of {context} tokens",
                ids.len()
            ));
        }
        Ok(())
    }

    fn complete(&self, prompts: &[String], params: &[LlmParams], done: &Done<'_>) -> Vec<Result<String, String>> {
        let mut out: Vec<Result<String, String>> = Vec::with_capacity(prompts.len());
        // Rows of one batch share temperature, top-p and length; seeds are per row.
        let mut i = 0;
        while i < prompts.len() {
            let p0 = &params[i];
            let mut j = i + 1;
            while j < prompts.len() && j - i < self.batch.max(1) && params[j].same_but_seed(p0) {
                j += 1;
            }
            let encoded: Result<Vec<Vec<u32>>, String> = prompts[i..j].iter().map(|p| self.encode(p)).collect();
            let sampling = if p0.temperature <= 0.0 {
                Sampling::Greedy
            } else {
                Sampling::Sample { temperature: p0.temperature, top_p: p0.top_p, seed: p0.seed }
            };
            let opts = GenerateOptions {
                max_new_tokens: p0.max_tokens,
                sampling,
                row_seeds: params[i..j].iter().map(|p| p.seed).collect(),
                ..GenerateOptions::default()
            };
            match encoded.and_then(|ids| {
                generate(&self.model.model, &self.model.tokenizer, &ids, &opts).map_err(|e| e.to_string())
            }) {
                Ok(gens) => out.extend(gens.into_iter().map(|g| Ok(g.text))),
                Err(e) => out.extend((i..j).map(|_| Err(e.clone()))),
            }
            for (k, r) in out[i..j].iter().enumerate() {
                done(i + k, r);
            }
            i = j;
        }
        out
    }
}

impl LocalLlm {
    /// A prompt as the user message of the model's chat template, in token ids.
    fn encode(&self, prompt: &str) -> Result<Vec<u32>, String> {
        let text = self
            .model
            .tokenizer
            .apply_chat_template(&[ChatMessage::new("user", prompt.to_string())], true)
            .map_err(|e| e.to_string())?;
        self.model.tokenizer.encode(&text, true).map_err(|e| e.to_string())
    }
}

/// Options of an LLM trace run.
#[derive(Debug, Clone)]
pub struct LlmRunOptions {
    /// Which traces, asked for by prompt: a positive with the trace prompt,
    /// negatives with a prompt asking for one mistake of a given type.
    /// Ignored when `on_policy` is set.
    pub wanted: Wanted,
    /// On-policy sampling instead: this many samples per question with the
    /// training prompt itself (the one pairs are made with) at
    /// `temperature_negative`; a sample reaching the gold answer is a
    /// positive, one reaching any wrong final answer (and naming a table or
    /// column) a negative — the model's own mistakes, plausible by
    /// construction. 0: off.
    pub on_policy: usize,
    /// Temperature of positives (0: greedy).
    pub temperature_positive: f64,
    /// Temperature of negatives.
    pub temperature_negative: f64,
    /// Nucleus threshold.
    pub top_p: f64,
    /// New tokens at most.
    pub max_tokens: usize,
    /// Base seed.
    pub seed: u64,
    /// Requests per generator call.
    pub chunk: usize,
    /// Builds the prompts (templates, tables' budget and token counter).
    pub prompter: Prompter,
}

struct Request {
    question: usize,
    /// For an on-policy sample, decided by its answer; here a placeholder.
    polarity: Polarity,
    /// An on-policy sample (see [`LlmRunOptions::on_policy`]).
    on_policy: bool,
    error: Option<ErrorType>,
    prompt: String,
    params: LlmParams,
}

/// Counts of one run, for the report.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LlmRunStats {
    /// Requests made.
    pub requests: usize,
    /// Answered from the cache.
    pub cached: usize,
    /// Failed calls (recorded as invalid traces with the reason; not
    /// cached, so a next run asks again).
    pub failed: usize,
    /// Requests not sent because the prompt does not fit the model's
    /// context (each recorded as its question's invalid trace).
    pub not_run: usize,
    /// The first failed call's reason.
    pub first_failure: Option<String>,
    /// Questions not asked, each `ID: why` (tables that cannot be opened or
    /// rendered, no gold answer to validate against).
    pub skipped: Vec<String>,
}

fn seed_of(base: u64, text: &str) -> u64 {
    text.bytes().fold(base ^ 0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Traces from an LLM for each question, validated, through the cache.
pub fn llm_traces(
    questions: &[Question],
    llm: &dyn Llm,
    cache: &CallCache,
    opts: &LlmRunOptions,
    reporter: &dyn Reporter,
) -> Result<(Vec<Trace>, LlmRunStats), Error> {
    let tracer = ProgramTracer::default();
    let mut requests = Vec::new();
    let mut context: HashMap<usize, (Answer, Evidence, Vec<String>)> = HashMap::new();
    let mut skipped = Vec::new();
    for (qi, q) in questions.iter().enumerate() {
        // A question that cannot be asked is counted and named, not dropped in silence.
        let db = match TableDb::open(&q.tables) {
            Ok(db) => db,
            Err(e) => {
                skipped.push(format!("{}: its tables cannot be opened: {e}", q.id));
                continue;
            }
        };
        let gold = match gold_answer(q, &db, &tracer) {
            Ok(gold) => gold,
            Err(e) => {
                skipped.push(format!("{}: no gold answer to validate against: {e}", q.id));
                continue;
            }
        };
        let tables = match opts.prompter.tables(&db, q) {
            Ok(t) => t,
            Err(e) => {
                skipped.push(format!("{}: its tables cannot be rendered: {}", q.id, e.message));
                continue;
            }
        };
        // Evidence: the tables, schema names, the question, and the gold SQL's executed steps.
        let (mut evidence, names) = question_evidence(q, &db);
        if let Some(t) = q.gold_sql.as_deref().and_then(|sql| tracer.trace(&db, sql, &StepCache::default()).ok()) {
            t.evidence.iter().for_each(|e| evidence.add(e));
        }
        context.insert(qi, (gold, evidence, names));
        let params = |polarity: &str, k: usize, temperature: f64| LlmParams {
            temperature,
            top_p: opts.top_p,
            max_tokens: opts.max_tokens,
            seed: seed_of(opts.seed, &format!("{}/{polarity}/{k}", q.id)),
        };
        if opts.on_policy > 0 {
            // Consecutive, so that a local model prefills the prompt once for all samples.
            let prompt = opts
                .prompter
                .text(q, &tables, PromptStyle::Trace)
                .map_err(|source| Error::Prompt { question: q.id.0.clone(), source })?;
            for k in 0..opts.on_policy {
                requests.push(Request {
                    question: qi,
                    polarity: Polarity::Positive,
                    on_policy: true,
                    error: None,
                    prompt: prompt.clone(),
                    params: params("sample", k, opts.temperature_negative),
                });
            }
            continue;
        }
        if opts.wanted.positive {
            let prompt = opts
                .prompter
                .text(q, &tables, PromptStyle::Trace)
                .map_err(|source| Error::Prompt { question: q.id.0.clone(), source })?;
            requests.push(Request {
                question: qi,
                polarity: Polarity::Positive,
                on_policy: false,
                error: None,
                prompt,
                params: params("positive", 0, opts.temperature_positive),
            });
        }
        for k in 0..opts.wanted.negatives {
            let et = ErrorType::ALL[(seed_of(opts.seed, &q.id.0) as usize + k) % ErrorType::ALL.len()];
            let prompt = opts
                .prompter
                .negative_text(q, &tables, et)
                .map_err(|source| Error::Prompt { question: q.id.0.clone(), source })?;
            requests.push(Request {
                question: qi,
                polarity: Polarity::Negative,
                on_policy: false,
                error: Some(et),
                prompt,
                params: params("negative", k, opts.temperature_negative),
            });
        }
    }

    let mut stats = LlmRunStats { requests: requests.len(), skipped, ..Default::default() };
    let (backend, model) = (llm.backend().to_string(), llm.model().to_string());
    let key = |r: &Request| CallKey {
        backend: backend.clone(),
        model: model.clone(),
        prompt: r.prompt.clone(),
        params: serde_json::to_value(&r.params).expect("params serialise"),
    };
    let mut completions: Vec<Option<Result<String, String>>> = Vec::with_capacity(requests.len());
    for r in &requests {
        let hit = cache.get(&key(r))?.and_then(|v| v.into_iter().next());
        stats.cached += usize::from(hit.is_some());
        let completion = match hit {
            Some(text) => Some(Ok(text)),
            None => llm.fits(&r.prompt, r.params.max_tokens).err().map(|why| {
                stats.not_run += 1;
                Err(format!("not run: {why}"))
            }),
        };
        completions.push(completion);
    }
    reporter
        .start((requests.len() - stats.cached - stats.not_run) as u64, &format!("{}:{}", llm.backend(), llm.model()));
    let mut missing: Vec<usize> = (0..requests.len()).filter(|&i| completions[i].is_none()).collect();
    // Longest prompts first: a batch pads its prompts to its longest, so
    // prompts of like length together prefill less padding (table prompts
    // run from a few hundred to 3,000 tokens), and the heaviest batches and
    // the peak memory come first. Stable, so the samples of one prompt stay
    // together (they share one prefill). The traces keep question order.
    missing.sort_by_key(|&i| std::cmp::Reverse(requests[i].prompt.len()));
    for chunk in missing.chunks(opts.chunk.max(1)) {
        let prompts: Vec<String> = chunk.iter().map(|&i| requests[i].prompt.clone()).collect();
        let params: Vec<LlmParams> = chunk.iter().map(|&i| requests[i].params.clone()).collect();
        // Each answer is stored the moment it arrives: a crash loses at most
        // the calls in flight.
        let store_errors = std::sync::Mutex::new(Vec::new());
        let store = |k: usize, r: &Result<String, String>| {
            if let Ok(text) = r {
                if let Err(e) = cache.put(&key(&requests[chunk[k]]), std::slice::from_ref(text)) {
                    store_errors.lock().expect("lock").push(e);
                }
            }
        };
        let results = llm.complete(&prompts, &params, &store);
        if let Some(e) = store_errors.into_inner().expect("lock").into_iter().next() {
            return Err(e);
        }
        for (&i, result) in chunk.iter().zip(results) {
            if let Err(e) = &result {
                stats.failed += 1;
                stats.first_failure.get_or_insert_with(|| e.clone());
            }
            completions[i] = Some(result);
        }
        reporter.advance(chunk.len() as u64);
    }
    reporter.finish();
    let generator = format!("{}:{}", llm.backend(), llm.model());
    if !missing.is_empty() && stats.failed == missing.len() {
        // A generator that is down must not silently leave a study without its traces.
        return Err(Error::Generator {
            generator,
            message: format!(
                "all {} calls failed, e.g. {}; answers already cached are kept: fix the cause and run again",
                stats.failed,
                stats.first_failure.as_deref().unwrap_or("?")
            ),
        });
    }

    let mut positives_by_q: HashMap<usize, Vec<String>> = HashMap::new();
    for (r, c) in requests.iter().zip(&completions) {
        if let (Polarity::Positive, false, Some(Ok(t))) = (r.polarity, r.on_policy, c) {
            positives_by_q.entry(r.question).or_default().push(t.clone());
        }
    }
    let mut traces = Vec::with_capacity(requests.len());
    for (r, c) in requests.iter().zip(completions) {
        let (gold, evidence, names) = &context[&r.question];
        let mut polarity = r.polarity;
        let (text, valid) = match c.expect("every request was answered") {
            Ok(text) if r.on_policy => {
                // The sample's own answer decides what it is.
                let v = match validate_positive(&text, gold) {
                    Ok(()) => Ok(()),
                    Err(_) => {
                        polarity = Polarity::Negative;
                        validate_llm_negative(&text, gold, names, &[], Kind::Any)
                    }
                };
                (text, v)
            }
            Ok(text) => {
                let v = match r.polarity {
                    Polarity::Positive => validate_positive(&text, gold),
                    Polarity::Negative => validate_llm_negative(
                        &text,
                        gold,
                        names,
                        positives_by_q.get(&r.question).map_or(&[][..], |v| v),
                        Kind::Gold,
                    ),
                };
                (text, v)
            }
            Err(e) if e.starts_with("not run: ") => (String::new(), Err(e)),
            Err(e) => (String::new(), Err(format!("generation failed: {e}"))),
        };
        traces.push(Trace {
            question_id: questions[r.question].id.to_string(),
            generator: generator.clone(),
            polarity,
            final_answer: extract_final_answer(&text),
            faithfulness: faithfulness(&text, evidence),
            valid: valid.is_ok(),
            invalid_reason: valid.err(),
            error_type: r.error,
            text,
            prompt: r.prompt.clone(),
            params: if r.on_policy {
                serde_json::json!({"model": llm.model(), "backend": llm.backend(), "sampling": r.params, "on_policy": true})
            } else {
                serde_json::json!({"model": llm.model(), "backend": llm.backend(), "sampling": r.params})
            },
        });
    }
    Ok((traces, stats))
}

fn validate_positive(text: &str, gold: &Answer) -> Result<(), String> {
    match extract_final_answer(text) {
        Some(a) if matches_gold(&a, gold) => Ok(()),
        Some(a) => Err(format!("final answer {a:?} does not match gold {:?}", gold.to_line())),
        None => Err("no final answer line".into()),
    }
}

/// What kind of wrong answer a negative may give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Gold's kind: as many values, numbers where gold has numbers. For
    /// negatives the model was asked to make (one subtle mistake): a list
    /// where gold has one name is no subtle mistake.
    Gold,
    /// Any wrong answer: an on-policy sample is the model's own mistake,
    /// plausible by construction, and a wrong count of rows (a filter
    /// missed) is among the mistakes it makes most.
    Any,
}

/// An LLM negative is valid when it has a final answer that does not match
/// gold (of gold's kind where `kind` says so), names a real table or column,
/// and copies no positive.
fn validate_llm_negative(
    text: &str,
    gold: &Answer,
    names: &[String],
    positives: &[String],
    kind: Kind,
) -> Result<(), String> {
    let a = extract_final_answer(text).ok_or("no final answer line")?;
    if matches_gold(&a, gold) {
        return Err("its final answer matches gold".into());
    }
    if positives.iter().any(|p| p == text) {
        return Err("it copies a positive".into());
    }
    let lower = text.to_lowercase();
    if !names.iter().any(|n| lower.contains(&n.to_lowercase())) {
        return Err("it names no table or column".into());
    }
    if kind == Kind::Any {
        return Ok(());
    }
    let (pred, want) = (split_values(&a), gold.values());
    let numeric = |v: &String| matches!(normalize(v), Norm::Number { .. });
    if pred.len() != want.len() || pred.iter().zip(&want).any(|(p, g)| numeric(p) != numeric(g)) {
        return Err(format!("its answer {a:?} is not of the same kind as gold {:?}", gold.to_line()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tabletrace_data::ResultSet;
    use tabletrace_data::Value;

    #[test]
    fn llm_negatives_must_be_plausible() {
        let gold = Answer::Table(ResultSet {
            columns: vec!["Name".into(), "n".into()],
            rows: vec![vec![Value::Text("Treasury".into()), Value::Real(231794.0)]],
            n_rows: 1,
            truncated: false,
        });
        let names = vec!["department".to_string(), "Name".to_string()];
        let ok = "Step 1: look at department.\nFinal answer: Defense, 3000000";
        assert!(validate_llm_negative(ok, &gold, &names, &[], Kind::Gold).is_ok());
        let same = "Step 1: look at department.\nFinal answer: Treasury, 231794";
        assert!(validate_llm_negative(same, &gold, &names, &[], Kind::Gold).unwrap_err().contains("matches gold"));
        let kind = "Step 1: look at department.\nFinal answer: Defense";
        assert!(validate_llm_negative(kind, &gold, &names, &[], Kind::Gold).unwrap_err().contains("same kind"));
        let unnamed = "Step 1: think.\nFinal answer: Defense, 3";
        assert!(validate_llm_negative(unnamed, &gold, &names, &[], Kind::Gold).unwrap_err().contains("names no table"));
        assert!(validate_llm_negative(ok, &gold, &names, &[ok.to_string()], Kind::Gold)
            .unwrap_err()
            .contains("copies"));
        assert!(validate_positive("x\nFinal answer: treasury, 231,794", &gold).is_ok());
        // An on-policy sample may be wrong in any way, but it must still be wrong,
        // name the tables and end with an answer.
        assert!(validate_llm_negative(kind, &gold, &names, &[], Kind::Any).is_ok());
        assert!(validate_llm_negative(same, &gold, &names, &[], Kind::Any).unwrap_err().contains("matches gold"));
        assert!(validate_llm_negative(unnamed, &gold, &names, &[], Kind::Any).unwrap_err().contains("names no table"));
        let unfinished = "Step 1: look at department.";
        assert!(validate_llm_negative(unfinished, &gold, &names, &[], Kind::Any).unwrap_err().contains("no final"));
    }
}
