//! The trainer's error type.

use std::path::PathBuf;

/// What can go wrong preparing or running training. Messages say what and
/// where (file and line, config key, step and batch) and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// Writing a file through `tabletrace-data` failed (names the file).
    #[error(transparent)]
    Data(#[from] tabletrace_data::Error),
    /// A data row is malformed.
    #[error("{path}:{line}: {message}")]
    Row {
        /// The data file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A configuration key has a bad value.
    #[error("config: {key}: {message}")]
    Config {
        /// The key (`loss.beta`).
        key: String,
        /// What is wrong.
        message: String,
    },
    /// Nothing to train on, or a checkpoint that does not fit.
    #[error("{0}")]
    Setup(String),
    /// The loss or a gradient went NaN or infinite.
    #[error("step {step}, micro-batch {micro_batch} (rows {rows}): {what} is not finite; lower the learning rate or check these rows")]
    NotFinite {
        /// 1-based optimizer step.
        step: usize,
        /// 0-based micro-batch within the step.
        micro_batch: usize,
        /// Ids of the rows in the micro-batch.
        rows: String,
        /// `loss` or `gradient`.
        what: &'static str,
    },
    /// Asked to stop (a signal): the steps done so far are in a checkpoint.
    #[error("stopped after step {step} of {total}: checkpoint {checkpoint}; run the same command again to resume")]
    Stopped {
        /// Optimizer steps done.
        step: usize,
        /// Steps of the whole run.
        total: usize,
        /// The checkpoint that holds them.
        checkpoint: PathBuf,
    },
    /// The model runtime failed.
    #[error(transparent)]
    Model(#[from] tabletrace_model::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches the path to an I/O error.
pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}
