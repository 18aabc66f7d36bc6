//! The data stage: which questions are trained on and which are held out.
//!
//! Held-out questions come from the eval split (or a hash of the id when the
//! data has no splits; in pilot mode, a dev slice of the training split). The
//! **unseen-SQL** subset holds the held-out questions whose gold SQL no
//! training question shares; the **cross-database** set holds the training
//! split's questions on databases held out of training entirely. The lists go
//! into the run directory: `train_ids.txt`, `eval_ids.txt`,
//! `eval_sets/{unseen_sql,cross_db,NAME}.txt` and `split.json`.

use std::path::Path;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::PipelineConfig;
use crate::error::{config, file, Error, Result};

/// What the data stage wrote: the sizes of every question set.
#[derive(Debug, Clone, Serialize)]
pub struct SplitSummary {
    /// Training questions (`train_ids.txt`).
    pub train: usize,
    /// Held-out questions (`eval_ids.txt`).
    pub eval: usize,
    /// Held-out questions whose gold SQL no training question shares (`eval_sets/unseen_sql.txt`).
    pub unseen_sql: usize,
    /// Training-split questions on held-out databases (`eval_sets/cross_db.txt`).
    pub cross_db: usize,
    /// The held-out databases.
    pub cross_db_databases: Vec<String>,
    /// Databases the training questions use.
    pub train_databases: usize,
    /// Further sets (`eval_sets/NAME.txt`).
    pub extra: std::collections::BTreeMap<String, usize>,
    /// Items of the data that could not be loaded (in no set: their split is unknown).
    pub load_errors: Vec<String>,
}

/// Gold SQL as compared for the unseen-SQL subset: lowercased, whitespace
/// collapsed, a trailing semicolon dropped.
pub fn normalised_sql(sql: &str) -> String {
    sql.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase().trim_end_matches(';').trim_end().to_string()
}

/// A number in [0, 1) from a hash of `key`.
pub(crate) fn unit_hash(key: &str) -> f64 {
    let h = Sha256::digest(key.as_bytes());
    u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as f64 / (u32::MAX as f64 + 1.0)
}

fn write_ids(path: &Path, ids: &[String]) -> Result<()> {
    let text = if ids.is_empty() { String::new() } else { ids.join("\n") + "\n" };
    Ok(tabletrace_data::write_atomic(path, text.as_bytes())?)
}

/// Splits question ids into training, held-out, unseen-SQL and
/// cross-database lists (by split or by a hash of the id; held-out
/// databases by list or by a hash of the database id), and the further
/// evaluation sets; writes them into the run directory.
pub fn split_questions(cfg: &PipelineConfig, dir: &Path) -> Result<SplitSummary> {
    let ds = tabletrace_data::load(
        &cfg.data,
        &tabletrace_data::LoadOptions { db_dir: cfg.db_dir.clone(), tables_json: None },
    )
    .map_err(|source| Error::Load {
        what: format!("loading {} (set `data` in the pipeline config)", cfg.data.display()),
        source,
    })?;
    let held_out_db = |db: &str| cfg.cross_db.iter().any(|d| d == db) || unit_hash(db) < cfg.cross_db_fraction;
    let (mut train, mut eval, mut cross) = (Vec::new(), Vec::new(), Vec::new());
    let mut cross_dbs = std::collections::BTreeSet::new();
    let mut train_dbs = std::collections::BTreeSet::new();
    let mut train_sql = std::collections::HashSet::new();
    for q in &ds.questions {
        let held_out = match (&cfg.train_split, &cfg.eval_split) {
            (Some(t), Some(e)) => {
                let (t, e) = (tabletrace_data::Split::parse(t), tabletrace_data::Split::parse(e));
                if cfg.dev_fraction > 0.0 {
                    // Pilot: the dev slice of the training split; the eval split stays unread.
                    if q.split.is_none() || q.split != t {
                        continue;
                    }
                    unit_hash(&format!("dev:{}", q.id.0)) < cfg.dev_fraction
                } else if q.split.is_some() && q.split == e {
                    true
                } else if q.split.is_some() && q.split == t {
                    false
                } else {
                    continue;
                }
            }
            _ if cfg.dev_fraction > 0.0 => {
                // Pilot without splits: the dev slice of what would be trained on.
                if unit_hash(&q.id.0) < cfg.eval_fraction {
                    continue;
                }
                unit_hash(&format!("dev:{}", q.id.0)) < cfg.dev_fraction
            }
            _ => unit_hash(&q.id.0) < cfg.eval_fraction,
        };
        if held_out {
            eval.push(q);
            continue;
        }
        let db = q.database_id();
        if held_out_db(&db) {
            cross.push(q.id.0.clone());
            cross_dbs.insert(db);
        } else {
            train.push(q.id.0.clone());
            train_sql.extend(q.gold_sql.as_deref().map(normalised_sql));
            train_dbs.insert(db);
        }
    }
    if let (Some(t), Some(e)) = (&cfg.train_split, &cfg.eval_split) {
        // A split the data does not have is named as such, not as an empty split.
        let mut have: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
        for q in &ds.questions {
            *have.entry(q.split.map_or("none".to_string(), |s| s.to_string())).or_default() += 1;
        }
        let listed = have.iter().map(|(s, n)| format!("{s} {n}")).collect::<Vec<_>>().join(", ");
        for (key, name) in [("train_split", t), ("eval_split", e)] {
            let want = tabletrace_data::Split::parse(name);
            if !ds.questions.iter().any(|q| q.split.is_some() && q.split == want) {
                return Err(config(
                    format!("{key} = {name:?}"),
                    format!("{} has no question of that split (it has: {listed})", cfg.data.display()),
                ));
            }
        }
    }
    if train.is_empty() || eval.is_empty() {
        return Err(Error::Split(format!(
            "the split left {} training and {} held-out questions",
            train.len(),
            eval.len()
        )));
    }
    let unseen: Vec<String> = eval
        .iter()
        .filter(|q| q.gold_sql.as_deref().is_none_or(|s| !train_sql.contains(&normalised_sql(s))))
        .map(|q| q.id.0.clone())
        .collect();
    let eval: Vec<String> = eval.iter().map(|q| q.id.0.clone()).collect();
    write_ids(&dir.join("train_ids.txt"), &train)?;
    write_ids(&dir.join("eval_ids.txt"), &eval)?;
    let sets = dir.join("eval_sets");
    std::fs::create_dir_all(&sets).map_err(file(&sets))?;
    write_ids(&sets.join("unseen_sql.txt"), &unseen)?;
    write_ids(&sets.join("cross_db.txt"), &cross)?;
    let mut extra = std::collections::BTreeMap::new();
    for set in &cfg.eval_sets {
        let ds = tabletrace_data::load(
            &set.data,
            &tabletrace_data::LoadOptions { db_dir: set.db_dir.clone(), tables_json: None },
        )
        .map_err(|source| Error::Load {
            what: format!("eval set {}: loading {}", set.name, set.data.display()),
            source,
        })?;
        let ids: Vec<String> = ds
            .questions
            .iter()
            .filter(|q| set.database.as_ref().is_none_or(|d| q.database_id() == *d) && q.n_tables() >= set.min_tables)
            .map(|q| q.id.0.clone())
            .collect();
        if ids.is_empty() {
            return Err(config(
                format!("eval_sets.{}", set.name),
                format!("no question of {} is selected", set.data.display()),
            ));
        }
        write_ids(&sets.join(format!("{}.txt", set.name)), &ids)?;
        extra.insert(set.name.clone(), ids.len());
    }
    let summary = SplitSummary {
        train: train.len(),
        eval: eval.len(),
        unseen_sql: unseen.len(),
        cross_db: cross.len(),
        cross_db_databases: cross_dbs.into_iter().collect(),
        train_databases: train_dbs.len(),
        extra,
        load_errors: ds.errors.iter().map(ToString::to_string).collect(),
    };
    let json = serde_json::to_string_pretty(&summary).expect("a summary serialises");
    tabletrace_data::write_atomic(&dir.join("split.json"), json.as_bytes())?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_is_compared_without_case_whitespace_or_a_final_semicolon() {
        assert_eq!(normalised_sql("SELECT  a\n FROM t ;"), normalised_sql("select a from T"));
        assert_ne!(normalised_sql("SELECT a FROM t WHERE x = 'A'"), normalised_sql("SELECT a FROM t"));
    }
}
