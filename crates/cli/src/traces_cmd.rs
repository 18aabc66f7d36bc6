//! `tabletrace traces`: reasoning traces for every question of a dataset.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use tabletrace_data::{load, LoadOptions, Polarity, Reporter, Trace};
use tabletrace_trace::{program_traces, ProgramTracer, Wanted};

use crate::progress::Bar;

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
    /// The generator: `program` (the SQL-grounded tracer).
    #[arg(long, default_value = "program")]
    generator: String,
    /// Which traces to make.
    #[arg(long, value_enum, default_value_t = PolarityArg::Both)]
    polarity: PolarityArg,
    /// Negatives per question at most.
    #[arg(long, default_value_t = 2)]
    negatives: usize,
    /// Seed for choosing perturbations.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output JSON lines, written atomically.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: TracesArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    if a.generator != "program" {
        bail!("generator {:?} is not available yet; use --generator program", a.generator);
    }
    let ds = load(&a.data, &LoadOptions { db_dir: a.db_dir.clone(), tables_json: None })
        .with_context(|| format!("loading {}", a.data.display()))?;
    let wanted = Wanted {
        positive: a.polarity != PolarityArg::Negative,
        negatives: if a.polarity == PolarityArg::Positive { 0 } else { a.negatives },
    };
    let tracer = ProgramTracer::default();
    let bar = Bar::new(quiet);
    bar.start(ds.questions.len() as u64, "tracing");
    let start = Instant::now();
    let mut traces: Vec<Trace> = Vec::new();
    let mut failed = 0usize;
    for (i, q) in ds.questions.iter().enumerate() {
        bar.advance(1);
        match program_traces(q, &tracer, wanted, a.seed.wrapping_add(i as u64)) {
            Ok(t) => traces.extend(t),
            Err(e) => {
                failed += 1;
                tracing::debug!(question_id = %q.id, "not traced: {e}");
            }
        }
    }
    bar.finish();
    let secs = start.elapsed().as_secs_f64();
    let tmp = a.out.with_extension("jsonl.tmp");
    {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
        );
        for t in &traces {
            serde_json::to_writer(&mut f, t)?;
            f.write_all(b"\n")?;
        }
        f.flush()?;
    }
    std::fs::rename(&tmp, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    let count = |p: Polarity, valid: bool| traces.iter().filter(|t| t.polarity == p && (!valid || t.valid)).count();
    let with = |p: Polarity| {
        let mut ids: Vec<&str> =
            traces.iter().filter(|t| t.polarity == p && t.valid).map(|t| t.question_id.as_str()).collect();
        ids.dedup();
        ids.len()
    };
    eprintln!(
        "{} questions ({} not traced) in {secs:.1} s ({:.0}/s): positives {} valid of {} ({} questions), negatives {} valid of {} ({} questions); wrote {}",
        ds.questions.len(),
        failed,
        ds.questions.len() as f64 / secs.max(1e-9),
        count(Polarity::Positive, true),
        count(Polarity::Positive, false),
        with(Polarity::Positive),
        count(Polarity::Negative, true),
        count(Polarity::Negative, false),
        with(Polarity::Negative),
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
