//! The trace crate's errors: what stops a trace run, naming the file,
//! generator, question or template involved.
//!
//! Per-item verdicts are not errors: a call that failed, a trace that does
//! not validate or a query the program tracer cannot follow is recorded on
//! its trace (`invalid_reason`) and counted, and the run goes on.

use std::path::PathBuf;

use crate::prompts::PromptError;

/// What stops a trace run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `--generator` value is malformed.
    #[error("generator {spec:?}: {message}")]
    Spec {
        /// The value as given.
        spec: String,
        /// What is wrong and the expected form.
        message: String,
    },
    /// The LLM call cache could not be opened, read or written.
    #[error("call cache {}: {message}", path.display())]
    Cache {
        /// The SQLite file.
        path: PathBuf,
        /// SQLite's or the JSON decoder's message.
        message: String,
    },
    /// A prompt template could not be read, parsed or rendered.
    #[error("prompt template {template}: {message}")]
    Template {
        /// The template's file name (`positive.jinja`) or folder.
        template: String,
        /// What is wrong.
        message: String,
    },
    /// A question's prompt could not be built.
    #[error("question {question}: {source}")]
    Prompt {
        /// The question id.
        question: String,
        /// Why.
        source: PromptError,
    },
    /// A generator failed as a whole (every call failed).
    #[error("generator {generator}: {message}")]
    Generator {
        /// `backend:model`.
        generator: String,
        /// What failed, with the first failure.
        message: String,
    },
}

/// `Result` with the trace crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
