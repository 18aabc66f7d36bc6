//! What survives a run: checkpoints on disk (listing, the newest one),
//! the metric lines a resumed run replaces, and the warm start from an
//! existing adapter.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use tabletrace_data::write_atomic;
use tabletrace_model::Lora;

use crate::error::{io, Error, Result};
use crate::trainer::TrainerState;

pub(crate) fn list_checkpoints(out: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let root = out.join("checkpoints");
    let Ok(entries) = std::fs::read_dir(&root) else { return Ok(Vec::new()) };
    let mut v = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name.strip_prefix("step-").and_then(|s| s.parse::<usize>().ok()) {
            if e.path().join("trainer_state.json").exists() {
                v.push((n, e.path()));
            }
        }
    }
    Ok(v)
}

/// The newest complete checkpoint under `out`, if any.
pub fn latest_checkpoint(out: &Path) -> Result<Option<(PathBuf, TrainerState)>> {
    let Some((_, dir)) = list_checkpoints(out)?.into_iter().max_by_key(|(s, _)| *s) else { return Ok(None) };
    let path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| Error::Setup(format!("{}: {e}", path.display())))?;
    Ok(Some((dir, state)))
}

/// Sets `lora`'s weights to those of the adapter in `dir`, which must have
/// the same scale (alpha / r) and the same adapted projections.
pub(crate) fn warm_start(lora: &Lora, dir: &Path, model: &tabletrace_model::Model) -> Result<()> {
    let bad = |message: String| Error::Config { key: "init_adapter".into(), message };
    let init = Lora::load(dir, model)?;
    if (init.config().scale() - lora.config().scale()).abs() > 1e-9 * lora.config().scale().abs().max(1.0) {
        return Err(bad(format!(
            "{}: its scale alpha/r is {}, the config's {}: use the same lora.r and lora.alpha",
            dir.display(),
            init.config().scale(),
            lora.config().scale()
        )));
    }
    let values: HashMap<String, Tensor> =
        init.named_vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    let ours: std::collections::BTreeSet<String> = lora.named_vars().into_iter().map(|(n, _)| n).collect();
    let theirs: std::collections::BTreeSet<String> = values.keys().cloned().collect();
    if ours != theirs {
        let missing = ours.difference(&theirs).next().or_else(|| theirs.difference(&ours).next());
        return Err(bad(format!(
            "{}: it adapts other projections or another rank than the config (first difference: {})",
            dir.display(),
            missing.map_or("?", String::as_str)
        )));
    }
    for (name, var) in lora.named_vars() {
        if var.as_tensor().dims() != values[&name].dims() {
            return Err(bad(format!(
                "{}: {name} has shape {:?}, the config's {:?}: use the same lora.r",
                dir.display(),
                values[&name].dims(),
                var.as_tensor().dims()
            )));
        }
    }
    lora.assign(&values)?;
    Ok(())
}

/// Drops metric lines past `step` (written after the checkpoint a run resumes from).
pub(crate) fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s as usize <= step)
        })
        .collect();
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    Ok(write_atomic(path, body.as_bytes())?)
}
