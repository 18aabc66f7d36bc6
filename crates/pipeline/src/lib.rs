//! The pipeline behind `tabletrace run`: data → traces → pairs → train →
//! eval → report, in one run directory, resumable stage by stage.
//!
//! - [`PipelineConfig`] is `pipeline.toml` (one section per stage), checked
//!   before any stage runs.
//! - [`split_questions`] is the data stage: training, held-out, unseen-SQL and
//!   cross-database question lists.
//! - [`eval_items`] turns questions into evaluation items: the gold-free
//!   prompt and the gold answer, or a `not_run` item that counts as wrong.
//! - [`Commands`] builds each stage's `tabletrace` command line (a stage is
//!   the binary's own command, run as a child process).
//! - [`Fingerprints`] digests every setting a stage's result depends on;
//!   [`RunDir`] keeps the `.STAGE.done` markers holding them and the wall
//!   time of each step, so a re-run skips what is done and resumes the rest.
//!
//! The binary (`tabletrace run`) holds the flags, the lock on the run
//! directory, signals, progress and printing.
//!
//! ```
//! use tabletrace_pipeline::{Fingerprints, PipelineConfig, EMBEDDED_DEFAULT};
//! let cfg: PipelineConfig = toml::from_str(EMBEDDED_DEFAULT).unwrap();
//! cfg.validate().unwrap();
//! let f = Fingerprints::new(&cfg);
//! assert_ne!(f.data(), f.traces());
//! ```
#![deny(missing_docs)]

mod commands;
mod config;
mod error;
mod eval_items;
mod fingerprint;
pub mod pairs;
mod run_dir;
mod split;
mod summary;

pub use commands::{Commands, EvalStep};
pub use config::{EvalStage, ExtraEvalSet, PairsStage, PipelineConfig, TracesStage, TrainStage, EMBEDDED_DEFAULT};
pub use error::{Error, Result};
pub use eval_items::{eval_items, not_run_item, PromptStats};
pub use fingerprint::{digest, Fingerprints};
pub use run_dir::{RunDir, Stage};
pub use split::{normalised_sql, split_questions, SplitSummary};
pub use summary::{add_compute_to_summary, note_failed_calls};
