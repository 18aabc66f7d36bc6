//! `tabletrace export trl RUN --out DIR`: a training run handed to TRL, for
//! one or many GPUs.
//!
//! From a training directory (`train_config.json`, as `tabletrace train` and
//! the pipeline's train stage write it) this writes:
//!
//! - `train.jsonl`: the rows the run's steps take, in the order tabletrace's
//!   trainer takes them (every epoch written out), as TRL reads them:
//!   preference rows as they are (prompt / chosen / rejected); for Q&A SFT
//!   the rendered prompt and the chosen trace's `Final answer:` line; for
//!   trace SFT prompt and chosen as prompt / completion;
//! - `tabletrace_train.json`: method, loss, LoRA, optimizer, schedule and
//!   batch settings, resolved;
//! - `train.py`: maps them to TRL's `CPOConfig` / `DPOConfig` / `SFTConfig`
//!   and PEFT's `LoraConfig` and trains with the rows in file order;
//! - `accelerate/{cpu,ddp,zero2,zero3,fsdp}.yaml` and a README.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};
use tabletrace_model::{load_model, LoadOptions, KNOWN_MODELS};
use tabletrace_train::examples::{final_answer_line, parse_row, Row};
use tabletrace_train::{Method, ScheduleKind, TrainConfig, Trainer};

const TRAIN_PY: &str = include_str!("../assets/trl/train.py");
const ACCELERATE: [(&str, &str); 5] = [
    ("cpu.yaml", include_str!("../assets/trl/accelerate/cpu.yaml")),
    ("ddp.yaml", include_str!("../assets/trl/accelerate/ddp.yaml")),
    ("zero2.yaml", include_str!("../assets/trl/accelerate/zero2.yaml")),
    ("zero3.yaml", include_str!("../assets/trl/accelerate/zero3.yaml")),
    ("fsdp.yaml", include_str!("../assets/trl/accelerate/fsdp.yaml")),
];

#[derive(Debug, Args)]
pub struct ExportTrlArgs {
    /// A training directory (holding train_config.json), e.g. runs/NAME/cpo.
    run: PathBuf,
    /// Where the TRL folder goes (created; files in it are replaced).
    #[arg(long)]
    out: PathBuf,
}

/// The run's config, from the `train_config.json` the trainer wrote.
fn read_config(run: &Path) -> anyhow::Result<TrainConfig> {
    let path = run.join("train_config.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("{}: not a training directory (no train_config.json; train there first)", run.display())
    })?;
    let mut v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    if let Some(o) = v.as_object_mut() {
        // What the trainer adds to the config when it writes it.
        for k in ["fingerprint", "resolved_loss", "total_steps"] {
            o.remove(k);
        }
    }
    serde_json::from_value(v).with_context(|| format!("{}: not a training config", path.display()))
}

/// A TRL row for `method` from one of the run's rows (`raw`: its JSON line).
fn trl_row(method: Method, row: &Row, raw: &Value) -> Option<Value> {
    match (method, row) {
        (Method::SftQa, Row::Preference { prompt, chosen, .. }) => {
            // Standard text: TRL appends the EOS text, as tabletrace does to the cut-out line.
            Some(json!({"prompt": prompt, "completion": final_answer_line(chosen)?}))
        }
        (Method::SftTrace, Row::Preference { .. }) => {
            Some(json!({"prompt": raw["prompt"], "completion": raw["chosen"]}))
        }
        (_, Row::Completion { .. }) => Some(json!({"prompt": raw["prompt"], "completion": raw["completion"]})),
        (_, Row::Preference { .. }) => {
            Some(json!({"prompt": raw["prompt"], "chosen": raw["chosen"], "rejected": raw["rejected"]}))
        }
    }
}

/// `tabletrace_train.json`: what train.py maps to TRL's and PEFT's configs.
fn trl_settings(cfg: &TrainConfig, trainer: &Trainer) -> anyhow::Result<Value> {
    let loss = trainer.loss_params();
    let known = KNOWN_MODELS.iter().find(|m| m.name == cfg.model || m.hub_id.eq_ignore_ascii_case(&cfg.model));
    let gguf = match tabletrace_model::resolve(&cfg.model) {
        Ok(tabletrace_model::ModelSource::Gguf(p)) => Some(p.canonicalize().unwrap_or(p).display().to_string()),
        _ => None,
    };
    let hf_model = match known {
        Some(m) => Some(m.hub_id.to_string()),
        None if gguf.is_none() => Some(cfg.model.clone()),
        None => None,
    };
    let total = trainer.total_steps();
    let schedule = match cfg.schedule.kind {
        ScheduleKind::Linear => "linear",
        ScheduleKind::Cosine => "cosine",
        ScheduleKind::Constant => "constant_with_warmup",
    };
    let loss_type = serde_json::to_value(loss.loss_type)?;
    Ok(json!({
        "method": cfg.method.name(),
        "hf_model": hf_model,
        "gguf": gguf,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "total_steps": total,
        "max_length": cfg.max_length,
        "seed": cfg.seed,
        "activation_checkpointing": cfg.activation_checkpointing,
        "lora": {
            "r": cfg.lora.r,
            "alpha": cfg.lora.alpha,
            "dropout": cfg.lora.dropout,
            "target_modules": cfg.lora.target_modules,
            "use_rslora": cfg.lora.use_rslora,
        },
        "optim": cfg.optim,
        "loss": {
            "loss_type": loss_type,
            "beta": loss.beta,
            "cpo_alpha": loss.cpo_alpha,
            "label_smoothing": loss.label_smoothing,
            "simpo_gamma": loss.simpo_gamma,
        },
        "lr_scheduler_type": schedule,
        "warmup_steps": tabletrace_train::optim::warmup_steps(&cfg.schedule, total),
    }))
}

pub fn trl(a: ExportTrlArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = read_config(&a.run)?;
    if let Some(init) = &cfg.init_adapter {
        bail!(
            "{}: the run starts from init_adapter {}; train.py starts from a fresh adapter (not exported yet)",
            a.run.display(),
            init.display()
        );
    }
    std::fs::create_dir_all(a.out.join("accelerate")).with_context(|| format!("cannot create {}", a.out.display()))?;
    let m = load_model(&cfg.model, &LoadOptions::default()).with_context(|| format!("cannot load {:?}", cfg.model))?;
    // The trainer, set up as the run was, gives the rows and their order;
    // its report of skipped rows goes to the export.
    cfg.output_dir = a.out.clone();
    let trainer = Trainer::new(cfg.clone(), &m, &tabletrace_data::Silent)?;
    let _ = std::fs::remove_file(a.out.join("reference_logps.jsonl"));

    let text = std::fs::read_to_string(&cfg.train).with_context(|| format!("cannot read {}", cfg.train.display()))?;
    let raw: Vec<&str> = text.lines().collect();
    let order = trainer.visit_order();
    let mut out = String::new();
    for &line in &order {
        let place = || format!("{}:{line}", cfg.train.display());
        // The trainer read and parsed this line already.
        let value: Value = serde_json::from_str(raw[line - 1]).with_context(place)?;
        let row = parse_row(&value, line, &m.tokenizer).map_err(|e| anyhow::anyhow!("{}: {e}", place()))?;
        let row = trl_row(cfg.method, &row, &value)
            .with_context(|| format!("{}: no TRL row for {}", place(), cfg.method.name()))?;
        out.push_str(&row.to_string());
        out.push('\n');
    }
    tabletrace_data::write_atomic(&a.out.join("train.jsonl"), out.as_bytes())?;
    let settings = trl_settings(&cfg, &trainer)?;
    tabletrace_data::write_atomic(
        &a.out.join("tabletrace_train.json"),
        serde_json::to_string_pretty(&settings)?.as_bytes(),
    )?;
    tabletrace_data::write_atomic(&a.out.join("train.py"), TRAIN_PY.as_bytes())?;
    for (name, text) in ACCELERATE {
        tabletrace_data::write_atomic(&a.out.join("accelerate").join(name), text.as_bytes())?;
    }
    let aligned = trainer.full_steps();
    let readme = readme(&cfg, &settings, aligned);
    tabletrace_data::write_atomic(&a.out.join("README.md"), readme.as_bytes())?;
    eprintln!(
        "{}: {} rows for {} steps of {} ({}); run: accelerate launch --config_file {}/accelerate/zero2.yaml {}/train.py",
        a.out.display(),
        order.len(),
        trainer.total_steps(),
        cfg.method.name(),
        if aligned { "the same batches as tabletrace's" } else { "an epoch ends in a short step: later batches shift" },
        a.out.display(),
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn readme(cfg: &TrainConfig, settings: &Value, aligned: bool) -> String {
    let model = settings["hf_model"].as_str().or(settings["gguf"].as_str()).unwrap_or("?");
    let batches = if aligned {
        "The rows are in the order tabletrace's trainer takes them, every epoch written out; train.py reads them in \
         file order, so each step sees tabletrace's batch."
    } else {
        "The rows are in the order tabletrace's trainer takes them; an epoch of this run ends in a short step, which \
         TRL's loader does not reproduce: from there on, batches shift by the missing rows."
    };
    format!(
        "# {method} with TRL (exported by `tabletrace export trl`)\n\n\
         The same training as tabletrace's run ({method}, {steps} steps of {batch} × {accum} rows, LoRA r={r} on \
         {targets}) with TRL, PEFT and accelerate. Base model: `{model}` (`--model` to change).\n\n\
         ```sh\n\
         pip install torch transformers trl peft accelerate datasets gguf\n\
         accelerate launch --config_file accelerate/cpu.yaml train.py     # one CPU process\n\
         accelerate launch --config_file accelerate/zero2.yaml train.py --bf16   # GPUs: ddp, zero2, zero3 or fsdp; set num_processes\n\
         tabletrace eval --model {model} --adapter out/adapter --data …   # the adapter reads back\n\
         ```\n\n\
         {batches} With several processes, set `batch_size` in tabletrace_train.json to the per-GPU share.\n\n\
         Files: `train.jsonl` (rows), `tabletrace_train.json` (settings), `train.py`, `accelerate/*.yaml` \
         (single CPU process, DDP, DeepSpeed ZeRO-2 and ZeRO-3, FSDP), `tokenize_report.json` (rows the run skipped).\n",
        method = cfg.method.name(),
        steps = settings["total_steps"],
        batch = cfg.batch_size,
        accum = cfg.grad_accum,
        r = cfg.lora.r,
        targets = cfg.lora.target_modules.join(", "),
    )
}
