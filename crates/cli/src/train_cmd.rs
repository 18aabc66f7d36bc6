//! `tabletrace train` and `tabletrace pairs score`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use tabletrace_model::{load_model, Adapter, LoadOptions};
use tabletrace_train::examples::{read_rows, tokenize, SftTarget};
use tabletrace_train::{LossConfig, LossType, Method, TrainConfig, Trainer};

use crate::progress::Bar;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// TOML config (see configs/ and the README); flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// cpo, simpo, cpo-simpo, hinge, ipo, sft-qa or sft-trace.
    #[arg(long)]
    method: Option<String>,
    /// Base model: short name, .gguf, HF folder or hub id.
    #[arg(long)]
    model: Option<String>,
    /// Training rows (pairs.jsonl, or prompt/completion JSONL for SFT).
    #[arg(long)]
    train: Option<PathBuf>,
    /// Held-out rows.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Share of --train held out when --eval is not given.
    #[arg(long)]
    eval_fraction: Option<f64>,
    /// Run directory.
    #[arg(long)]
    output_dir: Option<PathBuf>,
    #[arg(long)]
    epochs: Option<usize>,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Pairs (rows) per micro-batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    beta: Option<f64>,
    #[arg(long)]
    cpo_alpha: Option<f64>,
    #[arg(long)]
    lora_r: Option<usize>,
    #[arg(long)]
    lora_alpha: Option<f64>,
    #[arg(long)]
    max_length: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    save_every: Option<usize>,
    #[arg(long)]
    eval_every: Option<usize>,
    /// The frozen base products on bf16 AMX tiles (`bf16_products` in the TOML).
    #[arg(long)]
    bf16_products: bool,
}

/// The config from TOML, with flags on top.
pub fn resolve_config(a: &TrainArgs) -> anyhow::Result<TrainConfig> {
    let mut c = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
            TrainConfig::from_toml(&text, &p.display().to_string())?
        }
        None => TrainConfig::default(),
    };
    if let Some(m) = &a.method {
        c.method = Method::parse(m).with_context(|| {
            let all: Vec<_> = Method::ALL.iter().map(|m| m.name()).collect();
            format!("--method {m:?} is not one of {}", all.join(", "))
        })?;
    }
    macro_rules! set {
        ($($flag:ident => $($field:ident).+),* $(,)?) => {
            $(if let Some(v) = &a.$flag { c.$($field).+ = v.clone().into(); })*
        };
    }
    set!(model => model, train => train, output_dir => output_dir, epochs => epochs, max_steps => max_steps,
        batch_size => batch_size, grad_accum => grad_accum, lr => optim.lr, lora_r => lora.r,
        lora_alpha => lora.alpha, max_length => max_length, seed => seed, save_every => save_every,
        eval_every => eval_every, eval_fraction => eval_fraction);
    if let Some(e) = &a.eval {
        c.eval = Some(e.clone());
    }
    if a.bf16_products {
        c.bf16_products = true;
    }
    if let Some(b) = a.beta {
        c.loss.beta = Some(b);
    }
    if let Some(x) = a.cpo_alpha {
        c.loss.cpo_alpha = Some(x);
    }
    c.validate()?;
    Ok(c)
}

pub fn run(args: TrainArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    let cfg = resolve_config(&args)?;
    let _lock = crate::lock::DirLock::acquire(&cfg.output_dir, "tabletrace train")?;
    let (device, dtype) = cfg.device()?;
    let mut loaded = load_model(&cfg.model, &LoadOptions { device, dtype, ..LoadOptions::default() })
        .with_context(|| format!("cannot load the model {:?}", cfg.model))?;
    if cfg.bf16_products {
        loaded.model.use_bf16_products().context("bf16_products")?;
    }
    loaded.model.use_blocked_attention();
    let bar = Bar::new(quiet);
    crate::signals::install(true);
    let mut trainer = Trainer::new(cfg, &loaded, &bar)?;
    trainer.stop_when(crate::signals::stop_flag());
    let summary = match trainer.run() {
        Err(e @ tabletrace_train::Error::Stopped { .. }) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(130));
        }
        other => other?,
    };
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// Base model: short name, .gguf, HF folder or hub id.
    #[arg(long)]
    model: String,
    /// A PEFT LoRA adapter folder to score with.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Preference pairs (TRL JSONL, standard or conversational).
    #[arg(long)]
    pairs: PathBuf,
    /// sigmoid, hinge, ipo or simpo.
    #[arg(long, default_value = "sigmoid")]
    loss_type: String,
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    #[arg(long, default_value_t = 1.0)]
    cpo_alpha: f64,
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f64,
    #[arg(long, default_value_t = 0.5)]
    simpo_gamma: f64,
    /// Longest prompt + completion (tokens); longer completions are cut as TRL does.
    #[arg(long, default_value_t = 1024)]
    max_length: usize,
    /// Pairs per forward pass (the metrics are over all pairs).
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Print JSON (per-pair log-probs and the batch's metrics).
    #[arg(long)]
    json: bool,
}

/// Per-pair log-probs and the loss metrics of all pairs as one batch, without training.
pub fn score_pairs(a: ScoreArgs) -> anyhow::Result<ExitCode> {
    let loss_type = LossType::parse(&a.loss_type)
        .with_context(|| format!("--loss-type {:?} is not sigmoid, hinge, ipo or simpo", a.loss_type))?;
    let params = LossConfig {
        loss_type: Some(loss_type),
        beta: Some(a.beta),
        cpo_alpha: Some(a.cpo_alpha),
        label_smoothing: a.label_smoothing,
        simpo_gamma: Some(a.simpo_gamma),
    }
    .resolve(Method::Cpo);
    let m = load_model(&a.model, &LoadOptions::default()).with_context(|| format!("cannot load {:?}", a.model))?;
    let lora = match &a.adapter {
        Some(dir) => Some(crate::adapter::load(dir, &a.model, &m.model)?),
        None => None,
    };
    if let Some(l) = &lora {
        l.set_tracking(false); // scoring only: no graph
    }
    let rows = read_rows(&a.pairs, &m.tokenizer)?;
    let (examples, report) = tokenize(&rows, &m.tokenizer, a.max_length, true, SftTarget::Trace)?;
    for (id, why) in &report.skipped {
        eprintln!("skipped {id}: {why}");
    }
    let adapter = lora.as_ref().map(|l| l as &dyn Adapter);
    let scores =
        tabletrace_train::score_pairs(&m.model, adapter, &examples, &params, a.batch_size, m.tokenizer.pad_id())
            .with_context(|| format!("scoring {}", a.pairs.display()))?;
    let metrics: serde_json::Map<String, serde_json::Value> =
        scores.metrics.iter().map(|(k, v)| (k.clone(), (*v).into())).collect();
    if a.json {
        let out =
            serde_json::json!({"pairs": scores.pairs, "metrics": metrics, "params": params, "skipped": report.skipped});
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{:<32} {:>14} {:>14} {:>10}", "pair", "logps/chosen", "logps/rejected", "margin");
        for p in &scores.pairs {
            println!("{:<32} {:>14.4} {:>14.4} {:>10.4}", p.id, p.logp_chosen, p.logp_rejected, p.margin);
        }
        for (k, v) in &metrics {
            println!("{k:<20} {}", v);
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Base model: short name, .gguf, HF folder or hub id.
    #[arg(long)]
    model: String,
    /// The PEFT LoRA adapter folder.
    #[arg(long)]
    adapter: PathBuf,
    /// Output folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).
    #[arg(long)]
    out: PathBuf,
}

/// Merges an adapter into its base and writes a Hugging Face folder.
pub fn merge(a: MergeArgs) -> anyhow::Result<ExitCode> {
    let m = load_model(&a.model, &LoadOptions::default()).with_context(|| format!("cannot load {:?}", a.model))?;
    let lora = crate::adapter::load(&a.adapter, &a.model, &m.model)?;
    tabletrace_model::export_merged(&a.model, Some(&lora), &m.tokenizer, &a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("wrote {} (load it with --model {})", a.out.display(), a.out.display());
    Ok(ExitCode::SUCCESS)
}
