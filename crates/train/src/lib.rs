//! LoRA fine-tuning for tabletrace: the CPO family, DPO and SFT baselines,
//! exact against TRL, resumable.
//!
//! - [`TrainConfig`] (TOML) names the [`Method`], model, data, LoRA,
//!   loss, optimizer and schedule.
//! - [`examples`] reads TRL-format rows and tokenises them exactly as TRL's
//!   `CPOTrainer` / `DPOTrainer` / `SFTTrainer` do.
//! - [`objective`] scores sequences through the decoder's hidden states
//!   (chunked token log-probs) and computes TRL's losses and metrics.
//! - [`Trainer`] runs the loop: accumulation normalised as one big batch,
//!   AdamW, clipping, schedule, evaluation, checkpoints and exact resume,
//!   metrics JSONL with TRL's names, and a PNG of the curves ([`training_curves`], drawn by `tabletrace-plot`).
//!
//! ```no_run
//! use tabletrace_model::{load_model, LoadOptions};
//! use tabletrace_train::{TrainConfig, Trainer};
//!
//! let cfg = TrainConfig { train: "pairs.jsonl".into(), output_dir: "runs/cpo".into(), ..Default::default() };
//! let model = load_model(&cfg.model, &LoadOptions::default())?;
//! let summary = Trainer::new(cfg, &model, &tabletrace_data::Silent)?.run()?;
//! println!("adapter in {}", summary.adapter_dir.display());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

mod checkpoints;
mod config;
mod curves;
mod error;
pub mod examples;
pub mod objective;
pub mod optim;
pub mod reference;
mod scoring;
mod trainer;

pub use checkpoints::latest_checkpoint;
pub use config::{
    LoraSettings, LossConfig, LossParams, LossType, Method, OptimConfig, ScheduleConfig, ScheduleKind, TrainConfig,
};
pub use curves::training_curves;
pub use error::{Error, Result};
pub use scoring::{score_pairs, PairScore, PairScores};
pub use trainer::{TrainSummary, Trainer, TrainerState};
