//! What can go wrong in the pipeline's own work (config, split, run directory).

use std::path::{Path, PathBuf};

/// A pipeline error; each names the config key, file or evaluation set involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config value is wrong, or names something this machine lacks.
    #[error("config: {key}: {message}")]
    Config {
        /// The key (`train.save_every`, `eval_sets[0].name`).
        key: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// A file could not be read, written or parsed.
    #[error("{}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Loading a dataset failed.
    #[error("{what}: {source}")]
    Load {
        /// Which dataset (`data`, `eval set music_2`).
        what: String,
        /// The loader's error.
        source: tabletrace_data::Error,
    },
    /// Writing a file failed (the error names it).
    #[error(transparent)]
    Write(#[from] tabletrace_data::Error),
    /// The split left a set empty.
    #[error("{0}")]
    Split(String),
}

/// `Result` with the pipeline's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn config(key: impl Into<String>, message: impl Into<String>) -> Error {
    Error::Config { key: key.into(), message: message.into() }
}

/// For `map_err`: any error as a [`Error::File`] naming `path`.
pub(crate) fn file<E: std::fmt::Display>(path: &Path) -> impl FnOnce(E) -> Error + '_ {
    move |e| Error::File { path: path.to_path_buf(), message: e.to_string() }
}
