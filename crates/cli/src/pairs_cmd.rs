//! `tabletrace pairs`: preference pairs from validated traces.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use tabletrace_data::{approx_tokens, load, render_tables, Budget, LoadOptions, RowFormat, TableDb, Trace};
use tabletrace_trace::{build_pairs, pair_json, qa_prompt, PairOptions, PairPolicy};

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

#[derive(Debug, Args)]
pub struct PairsArgs {
    /// Traces from `tabletrace traces` (JSON lines).
    #[arg(long)]
    traces: PathBuf,
    /// The dataset the traces were made for (to render each question's prompt).
    #[arg(long)]
    data: PathBuf,
    /// Spider's database/ folder.
    #[arg(long)]
    db_dir: Option<PathBuf>,
    /// Heterogeneous: chosen and rejected from different generators.
    #[arg(long, value_enum, default_value_t = PolicyArg::Heterogeneous)]
    policy: PolicyArg,
    /// Pairs per question at most.
    #[arg(long, default_value_t = 4)]
    max_per_question: usize,
    /// Table rows shown per table in the prompt at most.
    #[arg(long, default_value_t = 30)]
    max_rows: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = PairFormat::Standard)]
    format: PairFormat,
    /// Output JSON lines (a report is written beside it as `.report.json`).
    #[arg(long)]
    out: PathBuf,
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
    let traces = read_traces(&a.traces)?;
    if traces.is_empty() {
        bail!("{} holds no traces", a.traces.display());
    }
    let ds = load(&a.data, &LoadOptions { db_dir: a.db_dir.clone(), tables_json: None })
        .with_context(|| format!("loading {}", a.data.display()))?;
    let wanted: std::collections::HashSet<&str> = traces.iter().map(|t| t.question_id.as_str()).collect();
    let budget = Budget { max_rows_per_table: Some(a.max_rows), max_tokens: None };
    let mut prompts = HashMap::new();
    for q in ds.questions.iter().filter(|q| wanted.contains(q.id.0.as_str())) {
        let db = TableDb::open(&q.tables).map_err(|f| anyhow::anyhow!("question {}: {}", q.id, f.message))?;
        let tables = render_tables(&db, q, RowFormat::Markdown, &budget, &approx_tokens)
            .map_err(|f| anyhow::anyhow!("question {}: {}", q.id, f.message))?;
        prompts.insert(q.id.0.clone(), qa_prompt(&q.text, &tables.text));
    }
    let policy = match a.policy {
        PolicyArg::Heterogeneous => PairPolicy::Heterogeneous,
        PolicyArg::Homogeneous => PairPolicy::Homogeneous,
    };
    let (pairs, report) = build_pairs(&traces, &prompts, &PairOptions { policy, max_per_question: a.max_per_question });
    let tmp = a.out.with_extension("jsonl.tmp");
    {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
        );
        for p in &pairs {
            serde_json::to_writer(&mut f, &pair_json(p, a.format == PairFormat::Conversational))?;
            f.write_all(b"\n")?;
        }
        f.flush()?;
    }
    std::fs::rename(&tmp, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    let report_path = a.out.with_extension("report.json");
    std::fs::write(&report_path, serde_json::to_string_pretty(&report)?)?;
    eprintln!(
        "{} pairs for {} of {} questions ({:?} policy); wrote {} and {}",
        report.pairs,
        report.questions_with_pairs,
        report.questions,
        policy,
        a.out.display(),
        report_path.display()
    );
    for (g, s) in &report.generators {
        eprintln!(
            "  {g:<28} positives {}/{} valid, negatives {}/{} valid",
            s.valid_positives, s.positives, s.valid_negatives, s.negatives
        );
    }
    for (why, n) in &report.dropped {
        eprintln!("  dropped {n} questions: {why}");
    }
    if !report.error_types.is_empty() {
        let h: Vec<String> = report.error_types.iter().map(|(e, n)| format!("{e} {n}")).collect();
        eprintln!("  error types: {}", h.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}
