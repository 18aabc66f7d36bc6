//! Evaluation of multi-table QA for tabletrace.
//!
//! - [`EvalItem`]: one question as the model sees it (the prompt, already
//!   rendered with its tables) with its gold answer, table count and
//!   [`Kind`] (from the gold SQL).
//! - [`evaluate`] generates answers in batches on the model runtime,
//!   extracts the `Final answer:` line and scores it ([`Prediction`]);
//!   [`EvalReport`] aggregates EM (value-set exact match), MMQA-style
//!   partial match, token F1 and numeric-tolerant match, overall, by table
//!   count and by question kind.
//! - [`compare`] scores runs on subsets of their questions and gives paired
//!   bootstrap intervals of their differences.
//! - [`report`] compares run directories side by side in Markdown with PNG charts.
//! - [`html`] writes the same as one self-contained page to browse, with every
//!   question, each run's answer, filters, and the preference pairs.
//!
//! ```no_run
//! use tabletrace_eval::{evaluate, EvalItem, EvalOptions, Kind};
//! use tabletrace_model::{load_model, LoadOptions};
//!
//! let m = load_model("smollm2-135m", &LoadOptions::default())?;
//! let items = vec![EvalItem {
//!     id: "q1".into(),
//!     prompt: "Table t: x\n1\n2\nQuestion: how many rows?\nEnd with 'Final answer: ...'.".into(),
//!     gold: tabletrace_data::Answer::Text { text: "2".into() },
//!     n_tables: 1,
//!     kind: Kind::Count,
//!     not_run: None,
//! }];
//! let (report, predictions) = evaluate(&m, &items, &EvalOptions::default(), &tabletrace_data::Silent)?;
//! println!("EM {:.3} over {}", report.em, report.n);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod compare;
mod error;
mod eval;
pub mod html;
pub mod report;

pub use error::{Error, Result};
pub use eval::{evaluate, extract_answer, Breakdown, EvalItem, EvalOptions, EvalReport, Kind, Prediction};
