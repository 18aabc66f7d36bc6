//! The `tabletrace` binary: flags and glue over the library crates.

mod bench_cmd;
mod chat_cmd;
mod data_cmd;
mod pairs_cmd;
mod progress;
mod traces_cmd;
mod train_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Fine-tune a LoRA adapter with the CPO family or SFT (config in TOML; flags override).
    Train(train_cmd::TrainArgs),
    /// Benchmarks (speed and memory; see tools/bench/ for runs beside peers).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Prefill and decode tokens/s and peak memory of a model, as one JSON line.
    Generate(bench_cmd::BenchGenerateArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TABLETRACE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
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
        Command::Bench { command: BenchCommand::Generate(args) } => bench_cmd::run(args),
    }
}
