//! `tabletrace data …`: inspect, check and render datasets.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use tabletrace_data::{
    check, load, Dataset, ExecLimits, LoadOptions, Provenance, Question, RowFormat, TableDb, TableSource,
};

use crate::progress::Bar;

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Print a human summary of a dataset, a folder of datasets or a database.
    Inspect(InspectArgs),
    /// Load every question, run its gold SQL and compare with the stored answers.
    Check(CheckArgs),
    /// Print one question with its tables rendered as prompt text.
    Prompt(DataPromptArgs),
}

/// Where a dataset is and what it refers to.
#[derive(Debug, Args)]
pub struct Source {
    /// An MMQA .jsonl/.json file, a Spider questions .json, a folder, a CSV folder or a SQLite file.
    path: PathBuf,
    /// Spider's database/ folder (<db_id>/<db_id>.sqlite inside). Default: database/ beside
    /// the file, else ../spider/database.
    #[arg(long)]
    db_dir: Option<PathBuf>,
    /// Spider's tables.json. Default: beside the questions file.
    #[arg(long)]
    tables: Option<PathBuf>,
}

impl Source {
    fn load(&self) -> anyhow::Result<Dataset> {
        if !self.path.exists() {
            bail!("{} does not exist", self.path.display());
        }
        let opts = LoadOptions { db_dir: self.db_dir.clone(), tables_json: self.tables.clone() };
        if let Some(d) = &opts.db_dir {
            if !d.is_dir() {
                bail!("--db-dir {} is not a folder", d.display());
            }
        }
        load(&self.path, &opts).with_context(|| format!("loading {}", self.path.display()))
    }
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    source: Source,
    /// Load errors to list (all are counted).
    #[arg(long, default_value_t = 5)]
    show_errors: usize,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    source: Source,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Exit non-zero when any item fails to load or any gold query fails.
    #[arg(long)]
    strict: bool,
    /// Time limit per query, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Rows kept per result (further rows are counted).
    #[arg(long, default_value_t = 10_000)]
    max_rows: usize,
    /// Issues listed in the human report (all are in the JSON).
    #[arg(long, default_value_t = 10)]
    show_issues: usize,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    Markdown,
    Csv,
}

#[derive(Debug, Args)]
pub struct DataPromptArgs {
    #[command(flatten)]
    source: Source,
    /// The question's id (e.g. mmqa_two_table:0). Default: the first question.
    #[arg(long)]
    id: Option<String>,
    /// How rows are written.
    #[arg(long, value_enum, default_value_t = FormatArg::Markdown)]
    format: FormatArg,
    /// How the prompt shows the tables (the same flags as `eval` and `traces`).
    #[command(flatten)]
    prompt: crate::prompt_args::PromptArgs,
}

pub fn run(cmd: DataCommand, quiet: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        DataCommand::Inspect(a) => inspect(a),
        DataCommand::Check(a) => check_cmd(a, quiet),
        DataCommand::Prompt(a) => prompt(a),
    }
}

fn inspect(a: InspectArgs) -> anyhow::Result<ExitCode> {
    let ds = a.source.load()?;
    println!("{}", a.source.path.display());
    for s in &ds.sources {
        println!(
            "  {:<48} {:<13} {:>6} questions {:>5} load errors",
            short(&s.path),
            format!("{:?}", s.format),
            s.questions,
            s.errors
        );
    }
    let qs = &ds.questions;
    println!("questions: {} loaded, {} failed to load", qs.len(), ds.errors.len());
    if !qs.is_empty() {
        let mut splits: BTreeMap<String, usize> = BTreeMap::new();
        let mut n_tables: BTreeMap<usize, usize> = BTreeMap::new();
        let mut dbs = BTreeSet::new();
        for q in qs {
            *splits.entry(q.split.map_or("none".to_string(), |s| s.to_string())).or_default() += 1;
            *n_tables.entry(q.n_tables()).or_default() += 1;
            if let TableSource::Sqlite { path, .. } = &q.tables {
                dbs.insert(path.clone());
            }
        }
        println!("splits: {}", join_counts(splits.iter().map(|(k, v)| (k.clone(), *v))));
        println!("tables per question: {}", join_counts(n_tables.iter().map(|(k, v)| (k.to_string(), *v))));
        let count = |f: &dyn Fn(&Question) -> bool| qs.iter().filter(|q| f(q)).count();
        println!(
            "gold: SQL {}, executed answers {}, published answers {}",
            count(&|q| q.gold_sql.is_some()),
            count(&|q| q.gold(Provenance::Executed).is_some()),
            count(&|q| q.gold(Provenance::Published).is_some())
        );
        if !dbs.is_empty() {
            println!("databases: {} distinct SQLite files", dbs.len());
        }
        let q = &qs[0];
        println!("first question: {} — {}", q.id, q.text);
    }
    for (name, source) in &ds.databases {
        println!("database {name}:");
        let db = TableDb::open(source).map_err(|f| anyhow::anyhow!("{name}: {}", f.message))?;
        let schema = db.schema().map_err(|f| anyhow::anyhow!("{name}: {}", f.message))?;
        for t in &schema.tables {
            let rows = db.count_rows(&t.name).map_err(|f| anyhow::anyhow!("{name}: {}", f.message))?;
            let pk = if t.primary_key.is_empty() {
                String::new()
            } else {
                format!(", primary key ({})", t.primary_key.join(", "))
            };
            println!("  {:<32} {:>3} columns {:>8} rows{pk}", t.name, t.columns.len(), rows);
        }
        for fk in &schema.foreign_keys {
            println!("  foreign key {}.{} -> {}.{}", fk.table, fk.column, fk.ref_table, fk.ref_column);
        }
    }
    if !ds.errors.is_empty() {
        println!("load errors (first {} of {}):", a.show_errors.min(ds.errors.len()), ds.errors.len());
        for e in ds.errors.iter().take(a.show_errors) {
            println!("  {e}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn check_cmd(a: CheckArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    let ds = a.source.load()?;
    let limits = ExecLimits { timeout: Duration::from_millis(a.timeout_ms), max_rows: a.max_rows };
    let report = check(&ds, limits, &Bar::new(quiet));
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let pct = |n: usize, d: usize| {
            if d == 0 {
                "n/a".to_string()
            } else {
                format!("{:.1}%", 100.0 * n as f64 / d as f64)
            }
        };
        println!("{}", a.source.path.display());
        println!("  questions        {:>7}", report.questions);
        println!("  loaded           {:>7}", report.loaded);
        println!("  load errors      {:>7}", report.load_errors);
        println!("  gold SQL ran     {:>7}", report.sql_ok);
        println!("  gold SQL failed  {:>7}  ({} timed out)", report.sql_error, report.sql_timeout);
        println!(
            "  agree executed   {:>7} of {} ({})",
            report.agree_executed,
            report.with_executed_label,
            pct(report.agree_executed, report.with_executed_label)
        );
        println!(
            "  agree published  {:>7} of {} ({})",
            report.agree_published,
            report.with_published_label,
            pct(report.agree_published, report.with_published_label)
        );
        println!(
            "  seconds          {:>10.3} ({:.0} questions/s)",
            report.seconds,
            report.loaded as f64 / report.seconds.max(1e-9)
        );
        if !report.issues.is_empty() {
            println!(
                "issues (first {} of {}; --json lists all):",
                a.show_issues.min(report.issues.len()),
                report.issues.len()
            );
            for i in report.issues.iter().take(a.show_issues) {
                println!("  [{}] {}: {}", i.kind, i.question_id, i.message);
            }
        }
    }
    let failed = report.load_errors + report.sql_error;
    if a.strict && failed > 0 {
        eprintln!(
            "error: --strict: {} items failed to load and {} gold queries failed",
            report.load_errors, report.sql_error
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn prompt(a: DataPromptArgs) -> anyhow::Result<ExitCode> {
    let ds = a.source.load()?;
    let q = match &a.id {
        Some(id) => ds.questions.iter().find(|q| q.id.0 == *id).with_context(|| {
            let first: Vec<&str> = ds.questions.iter().take(3).map(|q| q.id.0.as_str()).collect();
            format!("no question with id {id:?} in {} (ids look like {first:?})", a.source.path.display())
        })?,
        None => ds.questions.first().with_context(|| format!("{} holds no questions", a.source.path.display()))?,
    };
    let db = TableDb::open(&q.tables).map_err(|f| anyhow::anyhow!("question {}: {}", q.id, f.message))?;
    let format = match a.format {
        FormatArg::Markdown => RowFormat::Markdown,
        FormatArg::Csv => RowFormat::Csv,
    };
    let mut prompter = a.prompt.prompter(None)?;
    prompter.format = format;
    let rendered = prompter.tables(&db, q).map_err(|f| anyhow::anyhow!("question {}: {}", q.id, f.message))?;
    println!("# Question {}\n{}\n", q.id, q.text);
    print!("{}", rendered.text);
    if let Some(sql) = &q.gold_sql {
        println!("\n# Gold SQL\n{sql}");
    }
    for g in &q.gold {
        println!("# Gold answer ({:?})\n{}", g.provenance, g.answer.to_line());
    }
    let counted = if a.prompt.tokenizer.is_some() { "" } else { "~" };
    eprintln!("{} of {} rows shown, {counted}{} tokens", rendered.rows_shown, rendered.rows_total, rendered.tokens);
    Ok(ExitCode::SUCCESS)
}

/// The path, cut to its last 47 characters behind an ellipsis when longer than 48.
fn short(p: &Path) -> String {
    let s = p.display().to_string();
    let n = s.chars().count();
    if n > 48 {
        format!("…{}", s.chars().skip(n - 47).collect::<String>())
    } else {
        s
    }
}

fn join_counts(items: impl Iterator<Item = (String, usize)>) -> String {
    items.map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
}
