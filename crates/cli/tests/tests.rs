//! End-to-end tests of the `tabletrace` binary: the commands the README and
//! the acceptance checks use.

mod chat;
mod data;
mod export;
mod pipeline;
mod reliability;
mod report_html;
mod resume;
mod traces;
mod train;

use std::path::PathBuf;
use std::process::{Command, Output};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("the repository root exists")
}

/// Runs `tabletrace` with these arguments from the repository root.
pub fn tabletrace(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tabletrace")).args(args).current_dir(root()).output().expect("the binary runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
