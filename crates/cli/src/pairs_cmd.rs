//! `tabletrace pairs`: preference pairs from validated traces.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use tabletrace_data::{load, LoadOptions, TableDb, Trace};
use tabletrace_trace::{build_pairs, pair_json, PairOptions, PairPolicy, PromptStyle};

use crate::prompt_args::PromptArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PolicyArg {
    Heterogeneous,
    Homogeneous,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PairFormat {
    /// `prompt`/`chosen`/`rejected` strings.
    Standard,
    /// Message lists (`[{role, content}]`).
    Conversational,
}

#[derive(Debug, Subcommand)]
pub enum PairsCommand {
    /// Per-pair log-probs and the loss metrics of pairs under a model (and adapter), without training.
    Score(crate::train_cmd::ScoreArgs),
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct PairsArgs {
    #[command(subcommand)]
    pub command: Option<PairsCommand>,
    /// Traces from `tabletrace traces` (JSON lines).
    #[arg(long, required = true)]
    traces: Option<PathBuf>,
    /// The dataset the traces were made for (to render each question's prompt).
    #[arg(long, required = true)]
    data: Option<PathBuf>,
    /// Spider's database/ folder.
    #[arg(long)]
    db_dir: Option<PathBuf>,
    /// Heterogeneous: chosen and rejected from different generators.
    #[arg(long, value_enum, default_value_t = PolicyArg::Heterogeneous)]
    policy: PolicyArg,
    /// Pairs per question at most.
    #[arg(long, default_value_t = 4)]
    max_per_question: usize,
    /// How prompts show the tables (--tokenizer also measures --max-length).
    #[command(flatten)]
    prompt: PromptArgs,
    /// Drop pairs whose prompt plus chosen or rejected trace is longer than
    /// this many tokens of --tokenizer's model (reported).
    #[arg(long, requires = "tokenizer")]
    max_length: Option<usize>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = PairFormat::Standard)]
    format: PairFormat,
    /// Output JSON lines (a report is written beside it as `.report.json`).
    #[arg(long, required = true)]
    out: Option<PathBuf>,
}

fn read_traces(path: &PathBuf) -> anyhow::Result<Vec<Trace>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).with_context(|| format!("{}:{}: not a trace", path.display(), i + 1))?);
    }
    Ok(out)
}

pub fn run(a: PairsArgs) -> anyhow::Result<ExitCode> {
    let (Some(traces_path), Some(data), Some(out)) = (&a.traces, &a.data, &a.out) else {
        bail!("pairs needs --traces, --data and --out (or the `score` subcommand)");
    };
    crate::output::prepare(out, "--out")?;
    let traces = read_traces(traces_path)?;
    if traces.is_empty() {
        bail!("{} holds no traces", traces_path.display());
    }
    let ds = load(data, &LoadOptions { db_dir: a.db_dir.clone(), tables_json: None })
        .with_context(|| format!("loading {}", data.display()))?;
    let wanted: std::collections::HashSet<&str> = traces.iter().map(|t| t.question_id.as_str()).collect();
    let prompter = a.prompt.prompter(None)?;
    let mut prompts = HashMap::new();
    for q in ds.questions.iter().filter(|q| wanted.contains(q.id.0.as_str())) {
        let db = TableDb::open(&q.tables).map_err(|f| anyhow::anyhow!("question {}: {}", q.id, f.message))?;
        let prompt =
            prompter.prompt(&db, q, PromptStyle::Trace).map_err(|f| anyhow::anyhow!("question {}: {f}", q.id))?;
        prompts.insert(q.id.0.clone(), prompt.text);
    }
    let policy = match a.policy {
        PolicyArg::Heterogeneous => PairPolicy::Heterogeneous,
        PolicyArg::Homogeneous => PairPolicy::Homogeneous,
    };
    let (mut pairs, mut report) =
        build_pairs(&traces, &prompts, &PairOptions { policy, max_per_question: a.max_per_question });
    if let (Some(max), Some(spec)) = (a.max_length, &a.prompt.tokenizer) {
        // Only the tokenizer (with its chat template) is needed.
        let tok = tabletrace_model::load_tokenizer(spec).with_context(|| format!("loading the tokenizer of {spec}"))?;
        let len = |prompt: &str, completion: &str| -> anyhow::Result<usize> {
            let p = tok
                .apply_chat_template(&[tabletrace_model::ChatMessage::new("user", prompt)], true)
                .unwrap_or_else(|_| prompt.to_string());
            Ok(tok.encode(&p, true)?.len() + tok.encode(completion, false)?.len() + 1)
        };
        let before = pairs.len();
        let mut kept = Vec::with_capacity(pairs.len());
        for p in pairs {
            if len(&p.prompt, &p.chosen)? <= max && len(&p.prompt, &p.rejected)? <= max {
                kept.push(p);
            }
        }
        pairs = kept;
        let dropped = before - pairs.len();
        if dropped > 0 {
            report.dropped.insert(format!("pairs longer than {max} tokens of {spec}"), dropped);
        }
        // The counts describe the pairs kept.
        report.pairs = pairs.len();
        let mut qs: Vec<&str> = pairs.iter().map(|p| p.metadata.question_id.as_str()).collect();
        qs.sort();
        qs.dedup();
        report.questions_with_pairs = qs.len();
        report.error_types.clear();
        for e in pairs.iter().filter_map(|p| p.metadata.error_type) {
            *report.error_types.entry(e.to_string()).or_default() += 1;
        }
    }
    crate::output::write_jsonl(out, pairs.iter().map(|p| pair_json(p, a.format == PairFormat::Conversational)))?;
    let report_path = out.with_extension("report.json");
    std::fs::write(&report_path, serde_json::to_string_pretty(&report)?)?;
    eprintln!(
        "{} pairs for {} of {} questions ({:?} policy); wrote {} and {}",
        report.pairs,
        report.questions_with_pairs,
        report.questions,
        policy,
        out.display(),
        report_path.display()
    );
    for (g, s) in &report.generators {
        eprintln!(
            "  {g:<28} positives {}/{} valid, negatives {}/{} valid",
            s.valid_positives, s.positives, s.valid_negatives, s.negatives
        );
    }
    for (why, n) in &report.dropped {
        eprintln!("  dropped {n} {why}");
    }
    if !report.error_types.is_empty() {
        let h: Vec<String> = report.error_types.iter().map(|(e, n)| format!("{e} {n}")).collect();
        eprintln!("  error types: {}", h.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}
