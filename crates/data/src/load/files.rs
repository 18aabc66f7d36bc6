//! Plain files as datasets: a folder of CSV tables, and any SQLite file.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use super::{read_bytes, Dataset, LoadError};
use crate::answer::Answer;
use crate::error::{Error, Result};
use crate::question::{GoldAnswer, KeyHints, Origin, Provenance, Question, QuestionId, TableSource};
use crate::table::{Database, ForeignKey, Table};
use crate::value::Value;

/// `keys.json` beside CSV tables.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    /// `{"table": ["column", ...]}`.
    #[serde(default)]
    primary_keys: HashMap<String, Vec<String>>,
    /// `[{"from": "table.column", "to": "table.column"}]`.
    #[serde(default)]
    foreign_keys: Vec<KeyLink>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyLink {
    from: String,
    to: String,
}

/// One line of `questions.jsonl` beside CSV tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CsvQuestion {
    id: serde_json::Value,
    question: String,
    #[serde(default)]
    sql: Option<String>,
    #[serde(default)]
    answer: Option<serde_json::Value>,
}

/// Loads a folder of CSV files as one database (table name = file stem,
/// header row = column names, types inferred), with primary and foreign
/// keys from an optional `keys.json` and questions from an optional
/// `questions.jsonl` (`{id, question, sql?, answer?}` per line).
pub fn load_csv_dir(dir: &Path) -> Result<Dataset> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")))
        .collect();
    paths.sort();
    let mut db =
        Database { name: dir.file_name().and_then(|n| n.to_str()).unwrap_or("csv").to_string(), ..Default::default() };
    for p in &paths {
        db.tables.push(read_csv_table(p)?);
    }
    let keys_path = dir.join("keys.json");
    if keys_path.is_file() {
        let bytes = read_bytes(&keys_path)?;
        let keys: KeysFile = serde_json::from_slice(&bytes).map_err(|e| super::json_error(&keys_path, &bytes, e))?;
        apply_keys(&mut db, keys, &keys_path)?;
    }
    let db = Arc::new(db);
    let mut out = Dataset::default();
    let qpath = dir.join("questions.jsonl");
    if qpath.is_file() {
        let bytes = read_bytes(&qpath)?;
        for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let location = format!("{}:{}", qpath.display(), i + 1);
            match serde_json::from_slice::<CsvQuestion>(line) {
                Ok(q) => {
                    let id = match &q.id {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    out.questions.push(Question {
                        id: QuestionId(format!("{}:{id}", db.name)),
                        text: q.question,
                        tables: TableSource::Inline { db: db.clone(), declared_types: true },
                        gold_sql: q.sql,
                        gold: q
                            .answer
                            .as_ref()
                            .and_then(Answer::from_json)
                            .map(|answer| GoldAnswer { provenance: Provenance::Published, answer })
                            .into_iter()
                            .collect(),
                        split: None,
                        key_hints: KeyHints::default(),
                        origin: Origin { path: qpath.clone(), line: Some(i + 1) },
                    })
                }
                Err(e) => out.errors.push(LoadError { location, message: format!("invalid question: {e}") }),
            }
        }
    } else {
        out.databases.push((db.name.clone(), TableSource::Inline { db, declared_types: true }));
    }
    Ok(out)
}

fn read_csv_table(path: &Path) -> Result<Table> {
    let err = |message: String| Error::Csv { path: path.to_path_buf(), message };
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_path(path).map_err(|e| err(e.to_string()))?;
    let header = reader.byte_headers().map_err(|e| err(e.to_string()))?.clone();
    let names = header
        .iter()
        .enumerate()
        .map(|(i, h)| {
            String::from_utf8(h.to_vec()).map_err(|_| err(format!("line 1: column {} name is not valid UTF-8", i + 1)))
        })
        .collect::<Result<Vec<_>>>()?;
    if names.is_empty() || names.iter().all(String::is_empty) {
        return Err(err("no header row: the first line must name the columns".into()));
    }
    let mut rows = Vec::new();
    for record in reader.byte_records() {
        let record = record.map_err(|e| err(e.to_string()))?;
        let line = record.position().map_or(0, |p| p.line());
        let row = record
            .iter()
            .map(|f| {
                std::str::from_utf8(f)
                    .map(Value::from_csv_field)
                    .map_err(|e| err(format!("line {line}: not valid UTF-8 at byte {}", e.valid_up_to())))
            })
            .collect::<Result<Vec<_>>>()?;
        rows.push(row);
    }
    let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("table").to_string();
    Ok(Table::from_rows(name, names, rows))
}

fn apply_keys(db: &mut Database, keys: KeysFile, path: &Path) -> Result<()> {
    let bad = |message: String| Error::Json { path: path.to_path_buf(), line: None, message };
    for (table, cols) in keys.primary_keys {
        let t = db
            .tables
            .iter_mut()
            .find(|t| t.name.eq_ignore_ascii_case(&table))
            .ok_or_else(|| bad(format!("primary_keys names table {table:?}, which has no CSV file")))?;
        for c in &cols {
            if t.column_index(c).is_none() {
                return Err(bad(format!("primary_keys: table {table:?} has no column {c:?}")));
            }
        }
        t.primary_key = cols;
    }
    for link in keys.foreign_keys {
        let split = |s: &str| -> Result<(String, String)> {
            let (t, c) =
                s.split_once('.').ok_or_else(|| bad(format!("foreign key end {s:?} must be \"table.column\"")))?;
            let table =
                db.table(t).ok_or_else(|| bad(format!("foreign key names table {t:?}, which has no CSV file")))?;
            table.column_index(c).ok_or_else(|| bad(format!("foreign key: table {t:?} has no column {c:?}")))?;
            Ok((table.name.clone(), c.to_string()))
        };
        let (table, column) = split(&link.from)?;
        let (ref_table, ref_column) = split(&link.to)?;
        db.foreign_keys.push(ForeignKey { table, column, ref_table, ref_column });
    }
    Ok(())
}

/// Opens a SQLite file as a database without questions; every table of
/// the file is part of it.
pub fn load_sqlite_file(path: &Path) -> Result<Dataset> {
    let mut names = super::TableNames::default();
    let tables = names.of(path).map_err(|m| Error::Sqlite { path: path.to_path_buf(), message: m })?.to_vec();
    let tables =
        tables.into_iter().map(|t| crate::question::TableRef { name: t.clone(), source: t, rename: None }).collect();
    let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("sqlite").to_string();
    let mut out = Dataset::default();
    out.databases
        .push((name, TableSource::Sqlite { path: path.to_path_buf(), tables, isolate: false, declared_types: true }));
    Ok(out)
}
