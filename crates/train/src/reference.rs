//! DPO's frozen reference: the base model, or the adapter training starts
//! from (`init_adapter`, as TRL copies a pretrained adapter to `ref`), with
//! its log-probs of each pair computed once and kept.
//!
//! Reference log-probs are computed the first time a pair is seen, in one
//! forward of the pairs of a micro-batch that lack them (no adapter
//! gradients, no dropout), and appended to `reference_logps.jsonl` in the
//! output directory: a resumed run, a second epoch and every evaluation
//! reuse them. The file's first line names the config's fingerprint; a file
//! of other settings is started afresh. Pairs are keyed by a digest of
//! their token ids, so re-tokenising the same rows finds them again.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tabletrace_model::{Adapter, Lora, Model};

use crate::error::{io, Result};
use crate::examples::{batch_sequences, Example};
use crate::objective::{score, RefLogps};

/// One line of `reference_logps.jsonl`.
#[derive(Debug, Serialize, Deserialize)]
struct Line {
    key: String,
    chosen: f64,
    rejected: f64,
}

/// The first line: the settings the log-probs belong to.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    fingerprint: String,
}

/// The reference model and its cached log-probs.
pub struct Reference {
    /// `None`: the base model without an adapter.
    adapter: Option<Lora>,
    path: PathBuf,
    cache: Mutex<HashMap<String, RefLogps>>,
}

/// The cache key of a pair: a digest of both sequences' ids and completion starts.
fn key(e: &Example) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let Example::Preference { chosen, rejected, .. } = e else { unreachable!("DPO rows are pairs") };
    for seq in [chosen, rejected] {
        h.update((seq.completion_start as u64).to_le_bytes());
        h.update((seq.ids.len() as u64).to_le_bytes());
        for id in &seq.ids {
            h.update(id.to_le_bytes());
        }
    }
    h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect()
}

impl Reference {
    /// The reference for a run writing into `output_dir` under `fingerprint`:
    /// the base model, or `init_adapter` when training starts from one.
    /// Reads the log-probs a previous run of the same settings left.
    pub fn open(output_dir: &Path, fingerprint: &str, init_adapter: Option<&Path>, model: &Model) -> Result<Reference> {
        let adapter = init_adapter.map(|dir| Lora::load(dir, model)).transpose()?;
        if let Some(a) = &adapter {
            a.set_tracking(false);
            a.set_dropout_seed(None);
        }
        let path = output_dir.join("reference_logps.jsonl");
        let mut cache = HashMap::new();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut lines = text.lines();
        let same = lines
            .next()
            .and_then(|l| serde_json::from_str::<Header>(l).ok())
            .is_some_and(|h| h.fingerprint == fingerprint);
        if same {
            // A line torn by a kill does not parse: that pair is recomputed.
            for l in lines.filter_map(|l| serde_json::from_str::<Line>(l).ok()) {
                cache.insert(l.key, (l.chosen, l.rejected));
            }
        } else {
            let header = serde_json::to_string(&Header { fingerprint: fingerprint.to_string() }).expect("json");
            tabletrace_data::write_atomic(&path, format!("{header}\n").as_bytes())?;
        }
        Ok(Reference { adapter, path, cache: Mutex::new(cache) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, RefLogps>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pairs whose log-probs are kept.
    pub fn cached(&self) -> usize {
        self.lock().len()
    }

    /// The reference log-probs of `rows` (pairs), in order; those not yet
    /// known are computed in one forward and appended to the file.
    pub fn logps(&self, model: &Model, rows: &[&Example], pad_id: u32, chunk: usize) -> Result<Vec<RefLogps>> {
        let keys: Vec<String> = rows.iter().map(|e| key(e)).collect();
        let missing: Vec<usize> = {
            let cache = self.lock();
            (0..rows.len()).filter(|&i| !cache.contains_key(&keys[i])).collect()
        };
        if !missing.is_empty() {
            let todo: Vec<&Example> = missing.iter().map(|&i| rows[i]).collect();
            let seqs = batch_sequences(&todo);
            let adapter = self.adapter.as_ref().map(|a| a as &dyn Adapter);
            let scored = score(model, adapter, &seqs, true, pad_id, chunk)?;
            let sums: Vec<f64> = scored.logp_sums.to_dtype(candle_core::DType::F64)?.to_vec1()?;
            let n = todo.len();
            let mut file = std::fs::OpenOptions::new().append(true).open(&self.path).map_err(io(&self.path))?;
            let mut cache = self.lock();
            for (j, &i) in missing.iter().enumerate() {
                let (chosen, rejected) = (sums[j], sums[n + j]);
                let line = serde_json::to_string(&Line { key: keys[i].clone(), chosen, rejected }).expect("json");
                writeln!(file, "{line}").map_err(io(&self.path))?;
                cache.insert(keys[i].clone(), (chosen, rejected));
            }
        }
        let cache = self.lock();
        Ok(keys.iter().map(|k| cache[k]).collect())
    }
}
