//! The model runtime's error type.

use std::path::PathBuf;

/// What can go wrong loading or running a model. Messages say what and
/// where (file, tensor, token) and, where possible, what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A weights file is malformed or truncated.
    #[error("{path}: {message}")]
    Weights {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor is missing or has the wrong shape.
    #[error("tensor {name:?}: {message}")]
    Tensor {
        /// The checkpoint name of the tensor.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The configuration cannot be used.
    #[error("{source_name}: {message}")]
    Config {
        /// Where the configuration came from (config.json, GGUF metadata).
        source_name: String,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer cannot be built or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template does not render.
    #[error("chat template: {0}")]
    Template(String),
    /// The model name or path does not resolve.
    #[error("{0}")]
    NotFound(String),
    /// A request the model cannot serve (a prompt longer than the context).
    #[error("{0}")]
    Request(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
