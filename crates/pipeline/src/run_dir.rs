//! A run directory's bookkeeping: which stages are done (`.STAGE.done`
//! markers holding the stage's fingerprint), redoing from a stage, and the
//! wall time each stage took (`compute.json`, summed over resumed runs).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{file, Result};

/// The pipeline's stages, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Split the questions.
    Data,
    /// Make traces with every generator.
    Traces,
    /// Pair them.
    Pairs,
    /// Train every method.
    Train,
    /// Evaluate every arm on every set.
    Eval,
    /// Compare the arms.
    Report,
}

impl Stage {
    /// Every stage, in order.
    pub const ALL: [Stage; 6] = [Stage::Data, Stage::Traces, Stage::Pairs, Stage::Train, Stage::Eval, Stage::Report];

    /// Its name on `--from` / `--to` and in markers.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Data => "data",
            Stage::Traces => "traces",
            Stage::Pairs => "pairs",
            Stage::Train => "train",
            Stage::Eval => "eval",
            Stage::Report => "report",
        }
    }

    /// The stage called `name`; the error lists the names.
    pub fn parse(name: &str) -> std::result::Result<Stage, String> {
        Stage::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| format!("{name:?} is not one of {}", Stage::ALL.map(Stage::name).join(", ")))
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A run directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    dir: PathBuf,
}

impl RunDir {
    /// The run directory at `dir` (not created here).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        RunDir { dir: dir.into() }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// A path inside it.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.dir.join(rel)
    }

    fn marker(&self, key: &str) -> PathBuf {
        self.dir.join(format!(".{key}.done"))
    }

    /// Whether the step `key` (a stage, or `train-METHOD`, `eval-ARM-SET`)
    /// finished with this fingerprint.
    pub fn is_done(&self, key: &str, fingerprint: &str) -> bool {
        std::fs::read_to_string(self.marker(key)).is_ok_and(|s| s.trim() == fingerprint)
    }

    /// Marks the step `key` done with this fingerprint.
    pub fn finish(&self, key: &str, fingerprint: &str) -> Result<()> {
        Ok(tabletrace_data::write_atomic(&self.marker(key), fingerprint.as_bytes())?)
    }

    /// Forgets that `from` and every later stage finished (their outputs stay
    /// until redone).
    pub fn clear_from(&self, from: Stage) -> Result<()> {
        let entries = std::fs::read_dir(&self.dir).map_err(file(&self.dir))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Markers are `.STAGE.done` or, per method or arm, `.STAGE-NAME.done`.
            let later = Stage::ALL.iter().filter(|s| **s >= from).any(|s| {
                name == format!(".{s}.done") || (name.starts_with(&format!(".{s}-")) && name.ends_with(".done"))
            });
            if later {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// Adds `seconds` of wall time to `key` in `compute.json` (kept across
    /// resumed runs, so a stage split over sessions is counted whole).
    pub fn count_time(&self, key: &str, seconds: f64) -> Result<()> {
        let path = self.dir.join("compute.json");
        let mut all = self.compute();
        *all.entry(key.to_string()).or_default() += seconds;
        let json = serde_json::to_string_pretty(&all).expect("numbers serialise");
        Ok(tabletrace_data::write_atomic(&path, json.as_bytes())?)
    }

    /// `compute.json`: wall seconds per step key (empty when absent).
    pub fn compute(&self) -> BTreeMap<String, f64> {
        std::fs::read_to_string(self.dir.join("compute.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_hold_fingerprints_and_clear_from_forgets_later_stages_only() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::new(tmp.path());
        for key in ["data", "traces", "pairs", "train-cpo", "eval-base", "eval-cpo-cross_db"] {
            run.finish(key, "abc").unwrap();
        }
        assert!(run.is_done("traces", "abc"));
        assert!(!run.is_done("traces", "abd"), "another fingerprint is not done");
        run.clear_from(Stage::Train).unwrap();
        assert!(run.is_done("pairs", "abc"));
        assert!(!run.is_done("train-cpo", "abc"));
        assert!(!run.is_done("eval-cpo-cross_db", "abc"));
        assert_eq!(Stage::parse("eval"), Ok(Stage::Eval));
        assert!(Stage::parse("evaluate").unwrap_err().contains("data, traces, pairs, train, eval, report"));
    }

    #[test]
    fn compute_time_adds_up_over_resumed_runs() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::new(tmp.path());
        run.count_time("train-cpo", 10.0).unwrap();
        run.count_time("train-cpo", 5.5).unwrap();
        run.count_time("eval-base", 2.0).unwrap();
        assert_eq!(run.compute()["train-cpo"], 15.5);
        assert_eq!(run.compute().len(), 2);
    }
}
