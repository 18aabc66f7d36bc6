//! Reasoning traces for multi-table questions.
//!
//! - [`ProgramTracer`] turns a question's gold SQL into a step-by-step trace
//!   grounded in executed intermediate results; [`negatives`] applies one
//!   typed perturbation ([`ErrorType`](tabletrace_data::ErrorType)) and traces
//!   the wrong query the same way.
//! - [`validate`] extracts final answers and checks traces against gold;
//!   [`faithfulness`] scores the numbers and entities a trace cites.
//! - [`llm`] asks LLMs (the embedded model) for positive and negative traces,
//!   every call through the content-addressed [`CallCache`].
//! - [`pairs`] turns valid traces into TRL preference pairs.
//! - [`Prompter`] builds every prompt a model reads (training, evaluation,
//!   generators) from a question's gold-free view and its tables.
#![deny(missing_docs)]

pub mod cache;
mod error;
mod generate;
pub mod http;
pub mod llm;
pub mod pairs;
mod perturb;
mod program;
pub mod prompts;
mod spec;
mod sql;
pub mod validate;

pub use cache::{CallCache, CallKey};
pub use error::{Error, Result};
pub use generate::{error_types, gold_answer, program_traces, validate_negative, Wanted, NOT_WHOLE};
pub use http::{HttpLlm, HttpOptions};
pub use llm::{llm_traces, Done, Llm, LlmParams, LlmRunOptions, LlmRunStats, LocalLlm};
pub use pairs::{build_pairs, pair_json, PairOptions, PairPolicy, PairReport};
pub use perturb::{negatives, same_kind_but_wrong};
pub use program::{answer_line, ProgramTrace, ProgramTracer, StepCache};
pub use prompts::{PromptError, PromptStyle, PromptTemplates, Prompter, QuestionPrompt, TokenCounter};
pub use spec::GeneratorSpec;
pub use sql::parse_query;
pub use validate::{extract_final_answer, faithfulness, matches_gold, Evidence};
