//! Progress reporting for long stages; the binary draws it, libraries only call it.

/// Receives progress of a long stage. Every method has a do-nothing default.
pub trait Reporter {
    /// A stage with `total` items starts.
    fn start(&self, _total: u64, _label: &str) {}
    /// `n` more items are done.
    fn advance(&self, _n: u64) {}
    /// A short status beside the bar (the latest loss).
    fn message(&self, _text: &str) {}
    /// The stage ended.
    fn finish(&self) {}
}

/// A reporter that reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Reporter for Silent {}
