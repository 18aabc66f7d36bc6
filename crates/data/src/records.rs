//! Records shared by the trace factory and the trainer: reasoning traces and
//! preference pairs, as they are written to JSON lines.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Whether a trace is meant to reach the gold answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Polarity {
    /// Reaches the gold answer.
    Positive,
    /// Contains one error and reaches a wrong answer.
    Negative,
}

/// The kind of error a negative trace contains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// Joins the tables on the wrong column.
    WrongJoinKey,
    /// Leaves out one condition of the question.
    DroppedFilter,
    /// Turns a condition around (`>` for `<`, `=` for `!=`).
    FlippedFilter,
    /// Uses the wrong aggregate (`AVG` for `SUM`, `MIN` for `MAX`).
    WrongAggregate,
    /// Reports another column than the question asks for.
    WrongColumn,
    /// Sorts the wrong way.
    ReversedOrder,
    /// Takes the row next to the right one after sorting.
    OffByOneLimit,
    /// Gets a computed number slightly wrong.
    ArithmeticSlip,
    /// Filters on a value the question does not mention.
    HallucinatedValue,
    /// An error of another or unknown kind (LLM-written negatives).
    Other,
}

impl ErrorType {
    /// All the typed perturbations, in a fixed order.
    pub const ALL: [ErrorType; 9] = [
        ErrorType::WrongJoinKey,
        ErrorType::DroppedFilter,
        ErrorType::FlippedFilter,
        ErrorType::WrongAggregate,
        ErrorType::WrongColumn,
        ErrorType::ReversedOrder,
        ErrorType::OffByOneLimit,
        ErrorType::ArithmeticSlip,
        ErrorType::HallucinatedValue,
    ];

    /// The snake_case name used in files and prompts.
    pub fn name(self) -> &'static str {
        match self {
            ErrorType::WrongJoinKey => "wrong_join_key",
            ErrorType::DroppedFilter => "dropped_filter",
            ErrorType::FlippedFilter => "flipped_filter",
            ErrorType::WrongAggregate => "wrong_aggregate",
            ErrorType::WrongColumn => "wrong_column",
            ErrorType::ReversedOrder => "reversed_order",
            ErrorType::OffByOneLimit => "off_by_one_limit",
            ErrorType::ArithmeticSlip => "arithmetic_slip",
            ErrorType::HallucinatedValue => "hallucinated_value",
            ErrorType::Other => "other",
        }
    }

    /// A sentence describing the error, for prompts that ask an LLM to make it.
    pub fn describe(self) -> &'static str {
        match self {
            ErrorType::WrongJoinKey => "join two tables on the wrong column",
            ErrorType::DroppedFilter => "forget one of the conditions in the question",
            ErrorType::FlippedFilter => "apply one condition the wrong way round",
            ErrorType::WrongAggregate => "use the wrong aggregate (for example an average instead of a sum)",
            ErrorType::WrongColumn => "report a value from the wrong column",
            ErrorType::ReversedOrder => "sort in the wrong direction",
            ErrorType::OffByOneLimit => "pick the row next to the right one after sorting",
            ErrorType::ArithmeticSlip => "make a small arithmetic mistake in a computed number",
            ErrorType::HallucinatedValue => "filter on a value the question does not mention",
            ErrorType::Other => "make one subtle factual or logical mistake",
        }
    }
}

impl fmt::Display for ErrorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One reasoning trace for one question, with how it was made and how it
/// validated. One line of `traces.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// The question.
    pub question_id: String,
    /// The generator's name (`program`, `local:smollm2-135m`, `http:URL#MODEL`).
    pub generator: String,
    /// Meant to be right or wrong.
    pub polarity: Polarity,
    /// The trace, ending with a `Final answer: …` line.
    pub text: String,
    /// The answer extracted from the final line, if one was found.
    pub final_answer: Option<String>,
    /// Passed validation (see the trace crate's validator).
    pub valid: bool,
    /// Why it failed validation, if it did.
    pub invalid_reason: Option<String>,
    /// The error it contains (negatives).
    pub error_type: Option<ErrorType>,
    /// Share of numbers and entities it cites that exist in the tables or
    /// the executed intermediate results (0 to 1).
    pub faithfulness: f64,
    /// The prompt the generator was given (empty for the program tracer).
    pub prompt: String,
    /// Generator parameters (model, temperature, seed, …).
    pub params: serde_json::Value,
}

/// A preference pair in TRL's format, with metadata. One line of `pairs.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferencePair {
    /// The prompt (question and rendered tables).
    pub prompt: String,
    /// The preferred (positive) trace.
    pub chosen: String,
    /// The rejected (negative) trace.
    pub rejected: String,
    /// Where it came from.
    pub metadata: PairMetadata,
}

/// Provenance of a preference pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairMetadata {
    /// The question.
    pub question_id: String,
    /// Generator of the chosen trace.
    pub chosen_generator: String,
    /// Generator of the rejected trace.
    pub rejected_generator: String,
    /// The rejected trace's error type.
    pub error_type: Option<ErrorType>,
    /// Faithfulness of the chosen trace.
    pub chosen_faithfulness: f64,
    /// Faithfulness of the rejected trace.
    pub rejected_faithfulness: f64,
}
