//! `tabletrace eval` and `tabletrace report`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tabletrace_data::{
    approx_tokens, load, render_tables, Budget, LoadOptions, Provenance, Question, RowFormat, Split, TableDb,
};
use tabletrace_eval::{evaluate, EvalItem, EvalOptions, Kind};
use tabletrace_model::{load_model, LoadedModel, Lora};
use tabletrace_trace::{gold_answer, ProgramTracer, PromptTemplates};

use crate::progress::Bar;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PromptFormat {
    /// Question and tables → the answer on a `Final answer:` line (what Q&A SFT learns).
    Qa,
    /// The trace prompt (reason step by step, then `Final answer:`), as in the pairs.
    Trace,
}

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
    #[arg(long, value_enum, default_value_t = PromptFormat::Trace)]
    pub prompt_format: PromptFormat,
    #[arg(long, value_enum, default_value_t = Labels::Executed)]
    pub labels: Labels,
    /// Table rows shown per table at most.
    #[arg(long, default_value_t = 30)]
    pub max_rows: usize,
    /// Questions per generation batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// New tokens per answer at most.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Send the prompt without the model's chat template.
    #[arg(long)]
    pub no_chat_template: bool,
    /// A folder with `positive.jinja` replacing the built-in trace prompt.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Output: the report (JSON); predictions go beside it as `predictions.jsonl`.
    #[arg(long)]
    pub out: PathBuf,
}

/// The Q&A prompt: question and tables, the answer alone on a final line.
pub fn qa_prompt(question: &str, tables: &str) -> String {
    format!(
        "You are given the following tables.\n\n{tables}\nQuestion: {question}\n\n\
         Give only the answer, on one line that starts with \"Final answer:\"."
    )
}

/// Evaluation items for a dataset's questions; questions that cannot be
/// prepared are reported on stderr and counted.
pub fn eval_items(a: &EvalArgs) -> anyhow::Result<(Vec<EvalItem>, usize)> {
    let mut ds = load(&a.data, &LoadOptions { db_dir: a.db_dir.clone(), tables_json: None })
        .with_context(|| format!("loading {}", a.data.display()))?;
    if let Some(s) = &a.split {
        let want = Split::parse(s).with_context(|| format!("--split {s:?} is not train, dev, val or test"))?;
        ds.questions.retain(|q| q.split == Some(want));
    }
    if let Some(path) = &a.ids {
        let ids = crate::read_ids(path)?;
        ds.questions.retain(|q| ids.contains(q.id.0.as_str()));
    }
    if let Some(n) = a.limit {
        ds.questions = spread_sample(std::mem::take(&mut ds.questions), n);
    }
    anyhow::ensure!(!ds.questions.is_empty(), "{} has no questions to evaluate", a.data.display());
    let templates = PromptTemplates::load(a.prompts.as_deref()).map_err(anyhow::Error::msg)?;
    let budget = Budget { max_rows_per_table: Some(a.max_rows), max_tokens: None };
    let tracer = ProgramTracer::default();
    let mut items = Vec::new();
    let mut failed = 0;
    for q in &ds.questions {
        match eval_item(q, a, &templates, &budget, &tracer) {
            Ok(item) => items.push(item),
            Err(e) => {
                eprintln!("question {}: {e}", q.id);
                failed += 1;
            }
        }
    }
    Ok((items, failed))
}

fn eval_item(
    q: &Question,
    a: &EvalArgs,
    templates: &PromptTemplates,
    budget: &Budget,
    tracer: &ProgramTracer,
) -> Result<EvalItem, String> {
    let db = TableDb::open(&q.tables).map_err(|f| f.message)?;
    let gold = match (a.labels, q.gold(Provenance::Published)) {
        (Labels::Published, Some(p)) => p.clone(),
        _ => gold_answer(q, &db, tracer)?,
    };
    let tables = render_tables(&db, q, RowFormat::Markdown, budget, &approx_tokens).map_err(|f| f.message)?;
    let prompt = match a.prompt_format {
        PromptFormat::Qa => qa_prompt(&q.text, &tables.text),
        PromptFormat::Trace => templates.positive(&q.text, &tables.text),
    };
    Ok(EvalItem {
        id: q.id.0.clone(),
        prompt,
        kind: Kind::of(q.gold_sql.as_deref(), &gold),
        gold,
        n_tables: q.n_tables(),
    })
}

/// Loads the model and merges the adapter, if any.
pub fn load_with_adapter(model: &str, adapter: Option<&Path>) -> anyhow::Result<LoadedModel> {
    let mut m = load_model(model, &Default::default()).with_context(|| format!("cannot load the model {model:?}"))?;
    if let Some(dir) = adapter {
        let lora = Lora::load(dir, &m.model).with_context(|| format!("cannot load the adapter {}", dir.display()))?;
        m.model.merge_adapter(&lora)?;
    }
    Ok(m)
}

pub fn run(a: EvalArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    let (items, failed) = eval_items(&a)?;
    let m = load_with_adapter(&a.model, a.adapter.as_deref())?;
    let opts = EvalOptions { batch_size: a.batch, max_new_tokens: a.max_tokens, chat_template: !a.no_chat_template };
    let t0 = std::time::Instant::now();
    let (mut report, predictions) = evaluate(&m, &items, &opts, &Bar::new(quiet))?;
    report.labels = match a.labels {
        Labels::Executed => "executed (gold SQL run on the tables)".into(),
        Labels::Published => "published where present, else executed".into(),
    };
    report.setup = serde_json::json!({
        "model": a.model, "adapter": a.adapter, "data": a.data, "split": a.split,
        "prompt_format": format!("{:?}", a.prompt_format).to_lowercase(), "max_rows": a.max_rows,
        "max_tokens": a.max_tokens, "chat_template": !a.no_chat_template, "questions_failed": failed,
        "seconds": t0.elapsed().as_secs_f64(),
    });
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let preds_path = a.out.with_file_name("predictions.jsonl");
    let tmp = preds_path.with_extension("jsonl.tmp");
    {
        let mut f =
            std::io::BufWriter::new(std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?);
        for p in &predictions {
            writeln!(f, "{}", serde_json::to_string(p)?)?;
        }
        f.flush()?;
    }
    std::fs::rename(&tmp, &preds_path)?;
    let text = serde_json::to_string_pretty(&report)?;
    tabletrace_train::write_atomic(&a.out, text.as_bytes())?;
    println!("{text}");
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Run directories, each with an eval.json (and metrics.jsonl if trained).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Where report.md and the charts go. Default: the runs' common parent.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn report(a: ReportArgs) -> anyhow::Result<ExitCode> {
    let runs = tabletrace_eval::report::load_runs(&a.runs)?;
    let out = a.out.clone().unwrap_or_else(|| {
        a.runs[0].parent().filter(|p| !p.as_os_str().is_empty()).map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    });
    let md = tabletrace_eval::report::write_report(&runs, &out)?;
    print!("{md}");
    eprintln!("wrote {}", out.join("report.md").display());
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
