//! `tabletrace traces`: reasoning traces for every question of a dataset.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use tabletrace_data::{load, Polarity, Reporter, Trace};
use tabletrace_trace::{
    llm_traces, program_traces, CallCache, GeneratorSpec, HttpLlm, HttpOptions, Llm, LlmRunOptions, LocalLlm,
    ProgramTracer, Wanted, NOT_WHOLE,
};

use crate::progress::Bar;
use crate::prompt_args::PromptArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PolarityArg {
    Positive,
    Negative,
    Both,
}

#[derive(Debug, Args)]
pub struct TracesArgs {
    /// The dataset (see `tabletrace data check`).
    #[arg(long)]
    data: PathBuf,
    /// Spider's database/ folder.
    #[arg(long)]
    db_dir: Option<PathBuf>,
    /// Generators, repeatable: `program` (the SQL-grounded tracer),
    /// `local:MODEL` (the embedded model: a short name, .gguf file or folder)
    /// or `http:URL[,URL…]#MODEL` (an OpenAI-compatible server).
    #[arg(long = "generator", default_value = "program")]
    generators: Vec<GeneratorSpec>,
    /// The cache of LLM calls (SQLite). Default: `llm_cache.sqlite` beside --out.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// LLM prompts per batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// LLM sampling temperature for negatives (positives are greedy unless --temperature-positive).
    #[arg(long, default_value_t = 0.7)]
    temperature: f64,
    /// LLM sampling temperature for positives.
    #[arg(long, default_value_t = 0.0)]
    temperature_positive: f64,
    /// LLM new tokens per trace at most.
    #[arg(long, default_value_t = 384)]
    max_tokens: usize,
    /// HTTP requests in flight at most (over all endpoints).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// HTTP generators: send several samples of one prompt (--on-policy) as
    /// one request with OpenAI's `n`, up to this many (vLLM and SGLang serve
    /// them with one prefill). A server that answers with fewer choices gets
    /// the rest one per request. Default 1: one completion per request.
    #[arg(long, default_value_t = 1)]
    samples_per_request: usize,
    /// HTTP time-out per request, in seconds.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
    /// Environment variable holding the HTTP API key (never logged).
    #[arg(long, default_value = "OPENAI_API_KEY")]
    api_key_env: String,
    /// Run the embedded model on the GGUF's stored quantisation.
    #[arg(long)]
    quantized: bool,
    /// A LoRA adapter for the local model (e.g. a trace-SFT adapter, to
    /// sample on-policy traces from the warm-started model). It is part of
    /// the generator's name in the call cache, with a digest of its weights.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Which traces to make.
    #[arg(long, value_enum, default_value_t = PolarityArg::Both)]
    polarity: PolarityArg,
    /// Negatives per question at most.
    #[arg(long, default_value_t = 2)]
    negatives: usize,
    /// LLM generators sample N traces per question with the training prompt
    /// itself (at --temperature) instead of being asked for positives and
    /// negatives: a sample reaching the gold answer is a positive, one
    /// reaching any wrong final answer a negative (the model's own
    /// mistakes). A local model prefills each prompt once for its samples.
    #[arg(long, default_value_t = 0)]
    on_policy: usize,
    /// Seed for choosing perturbations.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The program tracer's join and condition steps that leave at most N
    /// rows list them, with the columns the rest of the query reads, so a
    /// later count or sum runs over rows written out in the trace. Default
    /// 0: those steps state their row count only.
    #[arg(long, default_value_t = 0)]
    list_rows: usize,
    /// How prompts show the tables (the program tracer traces only the
    /// questions whose tables they show whole).
    #[command(flatten)]
    prompt: PromptArgs,
    /// Only the questions whose ids are listed in this file (one per line).
    #[arg(long)]
    ids: Option<PathBuf>,
    /// Trace only the first N questions (in file order).
    #[arg(long)]
    limit: Option<usize>,
    /// Share of an LLM generator's calls that may fail (after retries)
    /// without failing the command. Failed calls are recorded as invalid
    /// traces with their reason and never cached, so a next run asks again.
    /// A generator whose calls all fail is an error whatever this says.
    #[arg(long, default_value_t = 0.0)]
    max_failed: f64,
    /// Output JSON lines, written atomically.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: TracesArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    crate::output::prepare(&a.out, "--out")?;
    if !(0.0..=1.0).contains(&a.max_failed) {
        bail!("--max-failed {} is not a share in [0, 1]", a.max_failed);
    }
    let ds = load(&a.data, &tabletrace_data::LoadOptions { db_dir: a.db_dir.clone(), tables_json: None })
        .with_context(|| format!("loading {}", a.data.display()))?;
    let mut ds = ds;
    if let Some(path) = &a.ids {
        let ids = crate::read_ids(path)?;
        ds.questions.retain(|q| ids.contains(q.id.0.as_str()));
    }
    if let Some(n) = a.limit {
        ds.questions.truncate(n);
    }
    let wanted = Wanted {
        positive: a.polarity != PolarityArg::Negative,
        negatives: if a.polarity == PolarityArg::Positive { 0 } else { a.negatives },
    };
    // Counted with --tokenizer's model, else the first local generator's.
    let local = a.generators.iter().find_map(|g| match g {
        GeneratorSpec::Local { model } => Some(model.as_str()),
        _ => None,
    });
    let prompter = a.prompt.prompter(local)?;
    let tracer = ProgramTracer { list_rows: a.list_rows, ..ProgramTracer::default() };
    let bar = Bar::new(quiet);
    let start = Instant::now();
    let mut traces: Vec<Trace> = Vec::new();
    let mut failed = 0usize;
    let mut not_whole = 0usize;
    // Generators whose failed calls exceed --max-failed: (generator, failed, calls, first reason).
    let mut too_many_failed = Vec::new();
    for g in &a.generators {
        if *g == GeneratorSpec::Program {
            bar.start(ds.questions.len() as u64, "program");
            for (i, q) in ds.questions.iter().enumerate() {
                bar.advance(1);
                match program_traces(q, &tracer, &prompter, wanted, a.seed.wrapping_add(i as u64)) {
                    Ok(t) => traces.extend(t),
                    Err(e) => {
                        failed += 1;
                        not_whole += usize::from(e.contains(NOT_WHOLE));
                        tracing::debug!(question_id = %q.id, "not traced: {e}");
                    }
                }
            }
            bar.finish();
        } else {
            let llm: Box<dyn Llm> = match g {
                GeneratorSpec::Program => unreachable!("handled above"),
                GeneratorSpec::Local { model: spec } => {
                    let model = crate::eval_cmd::load_with_adapter(spec, a.adapter.as_deref(), a.quantized)?;
                    Box::new(LocalLlm {
                        model,
                        name: local_name(spec, a.adapter.as_deref(), a.quantized)?,
                        batch: a.batch,
                    })
                }
                GeneratorSpec::Http { endpoints, model } => {
                    let opts = HttpOptions {
                        concurrency: a.concurrency,
                        timeout: std::time::Duration::from_secs(a.timeout_s),
                        api_key_env: Some(a.api_key_env.clone()),
                        samples_per_request: a.samples_per_request,
                        ..HttpOptions::default()
                    };
                    Box::new(HttpLlm::new(endpoints.clone(), model.clone(), opts))
                }
            };
            let cache_path = a.cache.clone().unwrap_or_else(|| a.out.with_file_name("llm_cache.sqlite"));
            let cache = CallCache::open(&cache_path)?;
            let run = LlmRunOptions {
                wanted,
                on_policy: a.on_policy,
                temperature_positive: a.temperature_positive,
                temperature_negative: a.temperature,
                top_p: 0.95,
                max_tokens: a.max_tokens,
                seed: a.seed,
                chunk: a.batch.max(a.concurrency) * 2,
                prompter: prompter.clone(),
            };
            let (t, stats) = llm_traces(&ds.questions, llm.as_ref(), &cache, &run, &bar)?;
            eprintln!(
                "{g}: {} requests, {} from the cache {}, {} failed, {} not run (prompt longer than the context)",
                stats.requests,
                stats.cached,
                cache_path.display(),
                stats.failed,
                stats.not_run
            );
            if let Some(first) = stats.skipped.first() {
                eprintln!("{g}: {} questions not asked, e.g. {first}", stats.skipped.len());
            }
            let calls = stats.requests - stats.cached - stats.not_run;
            if stats.failed as f64 > a.max_failed * calls as f64 {
                too_many_failed.push((
                    g.to_string(),
                    stats.failed,
                    calls,
                    stats.first_failure.clone().unwrap_or_default(),
                ));
            }
            traces.extend(t);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    crate::output::write_jsonl(&a.out, &traces)?;
    eprintln!(
        "{} questions ({} not traced by the program tracer, {not_whole} of them because their tables exceed \
         --table-tokens {}) in {secs:.1} s ({:.0}/s); wrote {}",
        ds.questions.len(),
        failed,
        a.prompt.table_tokens,
        ds.questions.len() as f64 / secs.max(1e-9),
        a.out.display()
    );
    // The names traces carry (`http:MODEL`, `local:SPEC+adapter:…`), in order of appearance.
    let mut names: Vec<&str> = Vec::new();
    for t in &traces {
        if !names.contains(&t.generator.as_str()) {
            names.push(&t.generator);
        }
    }
    for g in names {
        for p in [Polarity::Positive, Polarity::Negative] {
            let ts: Vec<&Trace> = traces.iter().filter(|t| t.generator == g && t.polarity == p).collect();
            if ts.is_empty() {
                continue;
            }
            let mut qs: Vec<&str> = ts.iter().filter(|t| t.valid).map(|t| t.question_id.as_str()).collect();
            let valid = qs.len();
            qs.sort();
            qs.dedup();
            let faith = faithfulness_summary(&ts);
            eprintln!(
                "  {g:<24} {:<8} {valid} valid of {} ({} questions), {faith}",
                format!("{p:?}").to_lowercase(),
                ts.len(),
                qs.len()
            );
        }
    }
    if let Some((g, failed, calls, why)) = too_many_failed.first() {
        bail!(
            "{g}: {failed} of {calls} calls failed (more than --max-failed {}), e.g. {why}; {} holds them as invalid \
             traces, and the answers that came are cached: run again to retry only the failed calls",
            a.max_failed,
            a.out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A local generator's name in traces and in the call cache: the model spec,
/// then `+adapter:DIGEST` (the first 8 bytes of the adapter weights' SHA-256,
/// so a retrained adapter at the same path is not answered from the cache)
/// and `+quantized` (its replies differ from the f32 weights').
fn local_name(spec: &str, adapter: Option<&Path>, quantized: bool) -> anyhow::Result<String> {
    use sha2::Digest;
    let mut name = spec.to_string();
    if let Some(dir) = adapter {
        let weights = dir.join("adapter_model.safetensors");
        let bytes = std::fs::read(&weights).with_context(|| format!("reading {}", weights.display()))?;
        let digest = sha2::Sha256::digest(&bytes);
        name.push_str("+adapter:");
        name.extend(digest.iter().take(8).map(|b| format!("{b:02x}")));
    }
    if quantized {
        name.push_str("+quantized");
    }
    Ok(name)
}

/// Mean faithfulness of the traces that have text: a failed call or a prompt
/// that was not run has none to judge (its stored 1.0 would flatter the mean).
fn faithfulness_summary(traces: &[&Trace]) -> String {
    let answered: Vec<f64> = traces.iter().filter(|t| !t.text.is_empty()).map(|t| t.faithfulness).collect();
    match answered.len() {
        0 => "no trace with text".to_string(),
        n => format!("mean faithfulness {:.2} of {n} with text", answered.iter().sum::<f64>() / n as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_traces_do_not_count_in_the_faithfulness_mean() {
        let trace = |text: &str, faithfulness: f64| Trace {
            question_id: "q".into(),
            generator: "http:m".into(),
            polarity: Polarity::Positive,
            text: text.into(),
            final_answer: None,
            valid: false,
            invalid_reason: None,
            error_type: None,
            faithfulness,
            prompt: String::new(),
            params: serde_json::Value::Null,
        };
        let (ok, failed) = (trace("Step 1: …", 0.5), trace("", 1.0));
        assert_eq!(faithfulness_summary(&[&ok, &failed, &failed]), "mean faithfulness 0.50 of 1 with text");
        assert_eq!(faithfulness_summary(&[&failed]), "no trace with text");
    }
}
