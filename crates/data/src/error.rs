//! The data layer's error type.

use std::path::PathBuf;

/// Everything that can go wrong while loading a dataset or a database.
///
/// Each variant names the file, line, table or question involved, so that a
/// message printed alone says what to fix and where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A JSON document (or one JSON line) does not parse or has the wrong shape.
    #[error("{path}{}: invalid JSON: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line number, for JSON-lines files and syntax errors.
        line: Option<usize>,
        /// What the parser said.
        message: String,
    },
    /// A CSV file does not parse.
    #[error("{path}: invalid CSV: {message}")]
    Csv {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A SQLite database could not be opened or read.
    #[error("{path}: sqlite: {message}")]
    Sqlite {
        /// The database file (`:memory:` for a private in-memory database).
        path: PathBuf,
        /// What SQLite said.
        message: String,
    },
    /// The path holds nothing this crate knows how to load.
    #[error("{path}: unknown dataset format: {hint}")]
    UnknownFormat {
        /// The file or folder.
        path: PathBuf,
        /// What was found and what was expected.
        hint: String,
    },
    /// The path was read, but nothing in it loaded.
    #[error("{path}: nothing loaded: {why}")]
    NothingLoaded {
        /// The file or folder.
        path: PathBuf,
        /// Why (empty, or every item failed: the first failure).
        why: String,
    },
    /// A question's data is inconsistent (a table it names is missing, a
    /// database file is absent, a field has an unusable value).
    #[error("question {question_id}: {message}")]
    Question {
        /// The question's id.
        question_id: String,
        /// What is wrong and, where possible, how to fix it.
        message: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
