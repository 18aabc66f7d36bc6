//! `tabletrace eval` and `tabletrace report`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tabletrace_data::{load, LoadOptions, Provenance, Split};
use tabletrace_eval::{evaluate, EvalItem, EvalOptions};
use tabletrace_model::{load_model, LoadedModel};
use tabletrace_pipeline::PromptStats;
use tabletrace_trace::PromptStyle;

use crate::progress::Bar;
use crate::prompt_args::PromptArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Labels {
    /// The result of the gold SQL on the tables (MMQA's published labels are noisy).
    Executed,
    /// The dataset's published answers, where present (else executed).
    Published,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model: short name, .gguf, HF folder or hub id.
    #[arg(long)]
    pub model: String,
    /// A PEFT LoRA adapter (merged into the weights for generation).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Run on the GGUF's stored quantisation (our int8 kernels: several times
    /// faster on CPU); an adapter then stays beside the quantised weights as
    /// its two factors, exactly.
    #[arg(long)]
    pub quantized: bool,
    /// The dataset (see `tabletrace data check`).
    #[arg(long)]
    pub data: PathBuf,
    /// Spider's database/ folder.
    #[arg(long)]
    pub db_dir: Option<PathBuf>,
    /// Only questions of this split (train, dev, val, test), when the data has splits.
    #[arg(long)]
    pub split: Option<String>,
    /// Only the questions whose ids are listed in this file (one per line).
    #[arg(long)]
    pub ids: Option<PathBuf>,
    /// Evaluate N questions only, spread evenly over the selection (every k-th
    /// in data order), so a subset keeps the mix of two- and three-table questions.
    #[arg(long)]
    pub limit: Option<usize>,
    /// `trace`: the training prompt (reason step by step, then `Final answer:`),
    /// as in the pairs; `qa`: the answer alone on a `Final answer:` line (what
    /// Q&A SFT learns).
    #[arg(long, value_parser = PromptStyle::parse, default_value = "trace")]
    pub prompt_format: PromptStyle,
    #[arg(long, value_enum, default_value_t = Labels::Executed)]
    pub labels: Labels,
    /// How prompts show the tables (tokens counted with --model's tokenizer
    /// unless --tokenizer says otherwise).
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Questions per generation batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// New tokens per answer at most.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Send the prompt without the model's chat template.
    #[arg(long)]
    pub no_chat_template: bool,
    /// Output: the report (JSON); predictions go beside it as `predictions.jsonl`.
    #[arg(long)]
    pub out: PathBuf,
}

/// Evaluation items for a dataset's questions, with what their prompts
/// showed. Questions that cannot be prepared are reported on stderr and
/// kept as `not_run` items (they count as wrong).
pub fn eval_items(a: &EvalArgs) -> anyhow::Result<(Vec<EvalItem>, PromptStats)> {
    let mut ds = load(&a.data, &LoadOptions { db_dir: a.db_dir.clone(), tables_json: None })
        .with_context(|| format!("loading {}", a.data.display()))?;
    if let Some(s) = &a.split {
        let want = Split::parse(s).with_context(|| format!("--split {s:?} is not train, dev, val or test"))?;
        ds.questions.retain(|q| q.split == Some(want));
    }
    if !ds.errors.is_empty() {
        eprintln!("{}: {} items could not be loaded, e.g. {}", a.data.display(), ds.errors.len(), ds.errors[0]);
    }
    // Ids asked for but not loaded are counted as wrong, not dropped (unless --limit subsamples).
    let mut missing: Vec<String> = Vec::new();
    if let Some(path) = &a.ids {
        let ids = crate::read_ids(path)?;
        ds.questions.retain(|q| ids.contains(q.id.0.as_str()));
        if a.limit.is_none() {
            let loaded: std::collections::HashSet<&str> = ds.questions.iter().map(|q| q.id.0.as_str()).collect();
            missing = ids.iter().filter(|id| !loaded.contains(id.as_str())).cloned().collect();
            missing.sort();
        }
    }
    if let Some(n) = a.limit {
        ds.questions = spread_sample(std::mem::take(&mut ds.questions), n);
    }
    anyhow::ensure!(
        !ds.questions.is_empty() || !missing.is_empty(),
        "{} has no questions to evaluate",
        a.data.display()
    );
    let prompter = a.prompt.prompter(Some(&a.model))?;
    let labels = match a.labels {
        Labels::Executed => Provenance::Executed,
        Labels::Published => Provenance::Published,
    };
    let (mut items, mut stats) = tabletrace_pipeline::eval_items(&ds.questions, labels, &prompter, a.prompt_format);
    for item in &items {
        if let Some(why) = &item.not_run {
            eprintln!("question {}: not asked (counted as wrong): {why}", item.id);
        }
    }
    for id in missing {
        let why = format!("listed in --ids but not loaded from {} (see the load errors)", a.data.display());
        eprintln!("question {id}: not asked (counted as wrong): {why}");
        stats.not_prepared += 1;
        items.push(tabletrace_pipeline::not_run_item(&id, why));
    }
    Ok((items, stats))
}

/// The flags that shape an evaluation besides the model, adapter, data and
/// questions: what re-evaluating an arm with the same settings needs.
fn eval_flags(a: &EvalArgs) -> Vec<String> {
    let mut v = vec![
        "--prompt-format".to_string(),
        a.prompt_format.name().to_string(),
        "--labels".into(),
        format!("{:?}", a.labels).to_lowercase(),
        "--table-tokens".into(),
        a.prompt.table_tokens.to_string(),
        "--max-tokens".into(),
        a.max_tokens.to_string(),
    ];
    if let Some(r) = a.prompt.max_rows {
        v.extend(["--max-rows".into(), r.to_string()]);
    }
    if let Some(t) = &a.prompt.tokenizer {
        v.extend(["--tokenizer".into(), t.clone()]);
    }
    if let Some(p) = &a.prompt.prompts {
        v.extend(["--prompts".into(), p.display().to_string()]);
    }
    if a.no_chat_template {
        v.push("--no-chat-template".into());
    }
    if a.quantized {
        v.push("--quantized".into());
    }
    v
}

/// Loads the model (on its stored quantisation if asked) and merges the adapter, if any.
pub fn load_with_adapter(model: &str, adapter: Option<&Path>, quantized: bool) -> anyhow::Result<LoadedModel> {
    let opts = tabletrace_model::LoadOptions { quantized, ..Default::default() };
    let mut m = load_model(model, &opts).with_context(|| format!("cannot load the model {model:?}"))?;
    if let Some(dir) = adapter {
        let lora = crate::adapter::load(dir, model, &m.model)?;
        m.model.merge_adapter(&lora)?;
    }
    Ok(m)
}

pub fn run(a: EvalArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    crate::output::prepare(&a.out, "--out")?;
    let (items, prompts) = eval_items(&a)?;
    let m = load_with_adapter(&a.model, a.adapter.as_deref(), a.quantized)?;
    let opts = EvalOptions { batch_size: a.batch, max_new_tokens: a.max_tokens, chat_template: !a.no_chat_template };
    let t0 = std::time::Instant::now();
    let (mut report, predictions) = evaluate(&m, &items, &opts, &Bar::new(quiet))?;
    report.labels = match a.labels {
        Labels::Executed => "executed (gold SQL run on the tables)".into(),
        Labels::Published => "published where present, else executed".into(),
    };
    report.setup = serde_json::json!({
        "eval_args": eval_flags(&a),
        "model": a.model, "adapter": a.adapter, "data": a.data, "split": a.split,
        "prompt_format": a.prompt_format.name().to_string(), "prompt": a.prompt.describe(),
        "max_tokens": a.max_tokens, "chat_template": !a.no_chat_template, "prompts": prompts,
        "seconds": t0.elapsed().as_secs_f64(),
    });
    crate::output::write_jsonl(&a.out.with_file_name("predictions.jsonl"), &predictions)?;
    let text = serde_json::to_string_pretty(&report)?;
    tabletrace_data::write_atomic(&a.out, text.as_bytes())?;
    println!("{text}");
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Run directories, each with an eval.json (and metrics.jsonl if trained).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Where report.md, summary.json and the charts go. Default: the runs' common parent.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A named subset of the evaluated questions, `NAME=IDS_FILE` (one id a
    /// line), scored separately (e.g. `unseen_sql=eval_sets/unseen_sql.txt`). Repeatable.
    #[arg(long = "subset", value_name = "NAME=IDS_FILE")]
    pub subsets: Vec<String>,
    /// A further evaluation set every run holds in a sub-folder of that name
    /// (its own eval.json and predictions.jsonl), e.g. `cross_db`. Repeatable.
    #[arg(long = "set", value_name = "NAME")]
    pub sets: Vec<String>,
    /// The run that differences are taken from (a run folder's name). Default: the first run.
    #[arg(long)]
    pub baseline: Option<String>,
    /// Preference pairs (TRL JSONL) to browse in report.html, chosen beside rejected.
    #[arg(long)]
    pub pairs: Option<PathBuf>,
}

pub fn report(a: ReportArgs) -> anyhow::Result<ExitCode> {
    let runs = tabletrace_eval::report::load_runs_with_sets(&a.runs, &a.sets)?;
    let out = a.out.clone().unwrap_or_else(|| {
        a.runs[0].parent().filter(|p| !p.as_os_str().is_empty()).map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    });
    let mut cmp =
        tabletrace_eval::report::Comparison { subsets: Vec::new(), sets: a.sets.clone(), baseline: a.baseline.clone() };
    for s in &a.subsets {
        let (name, file) = s.split_once('=').with_context(|| format!("--subset {s:?} is not NAME=IDS_FILE"))?;
        cmp.subsets.push((name.to_string(), crate::read_ids(Path::new(file))?));
    }
    let md = tabletrace_eval::report::write_report_comparing(&runs, &cmp, &out)?;
    tabletrace_eval::html::write_html(&runs, &cmp, a.pairs.as_deref(), &out)?;
    print!("{md}");
    eprintln!("wrote {} and {}", out.join("report.md").display(), out.join("report.html").display());
    Ok(ExitCode::SUCCESS)
}

/// `n` items spread evenly over `items` (indices ⌊i·len/n⌋), in order; all when `n ≥ len`.
fn spread_sample<T>(items: Vec<T>, n: usize) -> Vec<T> {
    let len = items.len();
    if n >= len {
        return items;
    }
    let keep: std::collections::HashSet<usize> = (0..n).map(|i| i * len / n).collect();
    items.into_iter().enumerate().filter(|(i, _)| keep.contains(i)).map(|(_, x)| x).collect()
}

#[cfg(test)]
mod tests {
    use super::spread_sample;

    #[test]
    fn spread_sample_takes_every_kth_and_keeps_order() {
        assert_eq!(spread_sample((0..10).collect(), 5), vec![0, 2, 4, 6, 8]);
        assert_eq!(spread_sample((0..10).collect(), 3), vec![0, 3, 6]);
        assert_eq!(spread_sample((0..4).collect(), 9), vec![0, 1, 2, 3]);
        assert_eq!(spread_sample((0..4).collect::<Vec<i32>>(), 0), Vec::<i32>::new());
    }
}
