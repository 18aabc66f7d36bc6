//! The `tabletrace` binary: flags and glue over the library crates.

mod adapter;
mod bench_cmd;
mod chat_cmd;
mod data_cmd;
mod eval_cmd;
mod export_cmd;
mod lock;
mod output;
mod pairs_cmd;
mod progress;
mod prompt_args;
mod run_cmd;
mod signals;
mod traces_cmd;
mod train_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc keeps freed memory for reuse. With glibc's allocator every
/// tensor above its mmap threshold (most activations and gradients of a
/// training step) was a fresh mapping, page-faulted in and zeroed by the
/// kernel, then unmapped: 15% of a CPO step's cycles were in the kernel.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_t`, the
/// same in mimalloc 2 and 3; the Rust bindings name no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory is never handed back to the OS while the process runs: a
/// training step frees and reallocates the same few gigabytes each step, and
/// giving them back (mimalloc's default, after 10 ms) costs the page faults
/// again. Peak memory is unchanged; the process just stays at its peak.
fn keep_freed_memory() {
    // SAFETY: sets a plain integer option; called before any thread starts.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Teach open-weight LLMs to reason over several relational tables.
#[derive(Debug, Parser)]
#[command(name = "tabletrace", version, about, long_about = None)]
struct Cli {
    /// Hide progress bars (they are also hidden when stderr is not a terminal).
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load, check and render multi-table QA datasets.
    Data {
        #[command(subcommand)]
        command: data_cmd::DataCommand,
    },
    /// Make reasoning traces (positive and negative) for a dataset's questions.
    Traces(traces_cmd::TracesArgs),
    /// Pair valid positive and negative traces into TRL preference data.
    Pairs(pairs_cmd::PairsArgs),
    /// Chat with a model: prints only the assistant's reply on stdout.
    Chat(chat_cmd::ChatArgs),
    /// The whole pipeline from one config (data → traces → pairs → train → eval → report), resumable.
    /// Without a config: the embedded default on the bundled sample.
    Run(run_cmd::RunArgs),
    /// Evaluate a model (and adapter) on multi-table questions: eval.json and predictions.jsonl.
    Eval(eval_cmd::EvalArgs),
    /// Compare run directories (each with eval.json) in Markdown with PNG charts.
    Report(eval_cmd::ReportArgs),
    /// Fine-tune a LoRA adapter with the CPO family or SFT (config in TOML; flags override).
    Train(train_cmd::TrainArgs),
    /// LoRA adapters: merge into the base and export a Hugging Face folder.
    Adapter {
        #[command(subcommand)]
        command: AdapterCommand,
    },
    /// Hand a training run to other tools (TRL + accelerate, for one or many GPUs).
    Export {
        #[command(subcommand)]
        command: ExportCommand,
    },
    /// Benchmarks (speed and memory; see tools/bench/ for runs beside peers).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AdapterCommand {
    /// Merge an adapter into its base model and write config.json, model.safetensors and the tokenizer.
    Merge(train_cmd::MergeArgs),
    /// Copy an adapter with its weights in another precision (f16 halves it).
    Cast(adapter::CastArgs),
}

#[derive(Debug, Subcommand)]
enum ExportCommand {
    /// The run's rows (in its order), settings and a TRL training script with accelerate
    /// configs (one CPU process, DDP, DeepSpeed ZeRO-2/3, FSDP).
    Trl(export_cmd::ExportTrlArgs),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Prefill and decode tokens/s and peak memory of a model, as one JSON line.
    Generate(bench_cmd::BenchGenerateArgs),
    /// f32 matrix product speed of candle's matmul (the trainer's products).
    Matmul(bench_cmd::BenchMatmulArgs),
}

/// candle runs large elementwise ops on its own thread pool, whose idle
/// workers spin 25,000 times before sleeping; the matrix products and our
/// kernels run on rayon's pool meanwhile, so on a small machine every spin
/// takes a core from a product. Idle workers sleep at once unless
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` says otherwise: −8% user cycles for a
/// CPO training step at 2 threads. Ops under 16 K elements (decoding) stay
/// on the calling thread and never wake the pool.
fn quiet_candle_pool() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: called first thing in `main`, before any thread exists.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0") };
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    quiet_candle_pool();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TABLETRACE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    // The command runs on a worker of the rayon pool over which the CPU
    // kernels (ours and candle's matmul) split their work, so that each of
    // the hundreds of parallel operations per token or training step starts
    // inside the pool instead of being sent to it from outside and waited for
    // (a wake-up and a sleep each). Workers get a main thread's stack.
    let result = match rayon::ThreadPoolBuilder::new().stack_size(64 << 20).build_global() {
        Ok(()) => rayon::scope(|_| run(cli)),
        Err(_) => run(cli),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Data { command } => data_cmd::run(command, cli.quiet),
        Command::Chat(args) => chat_cmd::run(args),
        Command::Traces(args) => traces_cmd::run(args, cli.quiet),
        Command::Pairs(args) => match args.command {
            Some(pairs_cmd::PairsCommand::Score(score)) => train_cmd::score_pairs(score),
            None => pairs_cmd::run(args),
        },
        Command::Train(args) => train_cmd::run(args, cli.quiet),
        Command::Eval(args) => eval_cmd::run(args, cli.quiet),
        Command::Run(args) => run_cmd::run(args, cli.quiet),
        Command::Adapter { command: AdapterCommand::Merge(args) } => train_cmd::merge(args),
        Command::Adapter { command: AdapterCommand::Cast(args) } => adapter::cast(args),
        Command::Report(args) => eval_cmd::report(args),
        Command::Export { command: ExportCommand::Trl(args) } => export_cmd::trl(args),
        Command::Bench { command: BenchCommand::Generate(args) } => bench_cmd::run(args),
        Command::Bench { command: BenchCommand::Matmul(args) } => bench_cmd::matmul(args),
    }
}

/// Question ids listed one per line in `path` (blank lines ignored).
pub fn read_ids(path: &std::path::Path) -> anyhow::Result<std::collections::HashSet<String>> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the id list {}", path.display()))?;
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect())
}
