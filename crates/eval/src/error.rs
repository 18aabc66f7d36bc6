//! What can go wrong evaluating or reporting.

/// What can go wrong evaluating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model runtime failed.
    #[error(transparent)]
    Model(#[from] tabletrace_model::Error),
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Nothing to evaluate or compare.
    #[error("{0}")]
    Empty(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
