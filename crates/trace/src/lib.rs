//! Reasoning traces for multi-table questions.
//!
//! - [`ProgramTracer`] turns a question's gold SQL into a step-by-step trace
//!   grounded in executed intermediate results; [`negatives`] applies one
//!   typed perturbation ([`ErrorType`](tabletrace_data::ErrorType)) and traces
//!   the wrong query the same way.
//! - [`validate`] extracts final answers and checks traces against gold;
//!   [`faithfulness`] scores the numbers and entities a trace cites.
//! - [`pairs`] turns valid traces into TRL preference pairs.
#![deny(missing_docs)]

mod generate;
mod perturb;
mod program;
mod sql;
pub mod validate;

pub use generate::{error_types, gold_answer, program_traces, validate_negative, Wanted};
pub use perturb::{negatives, same_kind_but_wrong};
pub use program::{answer_line, ProgramTrace, ProgramTracer, StepCache};
pub use sql::parse_query;
pub use validate::{extract_final_answer, faithfulness, matches_gold, Evidence};
