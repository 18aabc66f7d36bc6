//! A content-addressed cache of generator calls in a local SQLite file.
//!
//! The key is a SHA-256 of the backend, model, prompt and parameters; the
//! value is the list of completions. Every put commits at once (WAL mode),
//! so a run killed at any moment loses at most the call in flight, and a
//! rerun repeats no finished call.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};

/// The cache. It may be shared between threads (calls finishing on worker
/// threads store their answers at once).
pub struct CallCache {
    conn: std::sync::Mutex<Connection>,
    path: PathBuf,
}

impl std::fmt::Debug for CallCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallCache").field("path", &self.path).finish()
    }
}

/// One call's identity.
#[derive(Debug, Clone)]
pub struct CallKey {
    /// `local`, `http`, …
    pub backend: String,
    /// The model's name or path.
    pub model: String,
    /// The full prompt text.
    pub prompt: String,
    /// Generation parameters, as JSON (order of keys as written).
    pub params: serde_json::Value,
}

impl CallKey {
    /// The content address.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for part in [&self.backend, &self.model, &self.prompt, &self.params.to_string()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl CallCache {
    /// Opens (or creates) the cache file.
    pub fn open(path: &Path) -> Result<CallCache> {
        let err = |message: String| Error::Cache { path: path.to_path_buf(), message };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path).map_err(|e| err(e.to_string()))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS calls (
                key TEXT PRIMARY KEY, backend TEXT NOT NULL, model TEXT NOT NULL,
                params TEXT NOT NULL, completions TEXT NOT NULL, created REAL NOT NULL)",
        )
        .map_err(|e| err(e.to_string()))?;
        Ok(CallCache { conn: std::sync::Mutex::new(conn), path: path.to_path_buf() })
    }

    fn error(&self, message: String) -> Error {
        Error::Cache { path: self.path.clone(), message }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection usable.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached completions of a call, if any.
    pub fn get(&self, key: &CallKey) -> Result<Option<Vec<String>>> {
        let row: Option<String> = self
            .lock()
            .query_row("SELECT completions FROM calls WHERE key = ?1", [key.digest()], |r| r.get(0))
            .optional()
            .map_err(|e| self.error(e.to_string()))?;
        row.map(|j| serde_json::from_str(&j).map_err(|e| self.error(format!("corrupt entry: {e}")))).transpose()
    }

    /// Stores a call's completions (replacing any earlier entry).
    pub fn put(&self, key: &CallKey, completions: &[String]) -> Result<()> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        self.lock()
            .execute(
                "INSERT OR REPLACE INTO calls (key, backend, model, params, completions, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    key.digest(),
                    key.backend,
                    key.model,
                    key.params.to_string(),
                    serde_json::to_string(completions).expect("strings serialise"),
                    now
                ],
            )
            .map_err(|e| self.error(e.to_string()))?;
        Ok(())
    }

    /// Entries stored.
    pub fn len(&self) -> usize {
        self.lock().query_row("SELECT COUNT(*) FROM calls", [], |r| r.get::<_, i64>(0)).unwrap_or(0) as usize
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sqlite");
        let key = CallKey {
            backend: "local".into(),
            model: "m".into(),
            prompt: "p".into(),
            params: serde_json::json!({"t": 0}),
        };
        let other = CallKey { prompt: "p2".into(), ..key.clone() };
        {
            let c = CallCache::open(&path).unwrap();
            assert_eq!(c.get(&key).unwrap(), None);
            c.put(&key, &["a".into(), "b".into()]).unwrap();
        }
        let c = CallCache::open(&path).unwrap();
        assert_eq!(c.get(&key).unwrap(), Some(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(c.get(&other).unwrap(), None);
        assert_ne!(key.digest(), other.digest());
        assert_eq!(c.len(), 1);
    }
}
