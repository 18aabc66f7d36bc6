//! What can go wrong when drawing a chart.

use std::path::PathBuf;

/// A chart that could not be drawn or written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No series with points: there is nothing to draw.
    #[error("nothing to plot")]
    Empty,
    /// The PNG file could not be written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The PNG encoder failed.
    #[error("{}: {source}", path.display())]
    Png {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: png::EncodingError,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
