//! MMQA loaders: the JSON-lines files whose rows come from Spider databases,
//! and MMQA's own record format with the rows embedded.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value as J;

use super::{read_bytes, Dataset, LoadError, LoadOptions, TableNames};
use crate::answer::Answer;
use crate::error::Result;
use crate::mojibake::repair_json;
use crate::question::{GoldAnswer, KeyHints, Origin, Provenance, Question, QuestionId, Split, TableRef, TableSource};
use crate::table::{Database, Table};
use crate::value::Value;

fn stem(path: &Path) -> String {
    path.file_stem().and_then(|s| s.to_str()).unwrap_or("mmqa").to_string()
}

/// The Spider `database/` folder for a dataset file: `opts.db_dir`, else
/// `database/` beside the file, else `../spider/database`.
pub(crate) fn resolve_db_dir(path: &Path, opts: &LoadOptions) -> Option<PathBuf> {
    if let Some(d) = &opts.db_dir {
        return Some(d.clone());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    [dir.join("database"), dir.join("../spider/database")].into_iter().find(|d| d.is_dir())
}

fn strings(v: Option<&J>) -> Vec<String> {
    v.and_then(J::as_array)
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

fn str_field<'a>(rec: &'a J, key: &str) -> std::result::Result<&'a str, String> {
    rec.get(key).and_then(J::as_str).ok_or_else(|| format!("field {key:?} is missing or not a string"))
}

fn id_of(rec: &J) -> Option<String> {
    match rec.get("id_").or_else(|| rec.get("id")) {
        Some(J::Number(n)) => Some(n.to_string()),
        Some(J::String(s)) => Some(s.clone()),
        _ => None,
    }
}

fn key_hints(rec: &J) -> KeyHints {
    KeyHints { primary: strings(rec.get("primary_keys")), foreign: strings(rec.get("foreign_keys")) }
}

/// Loads an MMQA JSON-lines file (`mmqa_two_table.jsonl`): one question a
/// line, rows taken from the Spider database named in `spider_db_id`.
/// Lines that are not valid UTF-8 or JSON, and questions whose database or
/// tables are missing, become load errors.
pub fn load_mmqa_jsonl(path: &Path, opts: &LoadOptions) -> Result<Dataset> {
    let bytes = read_bytes(path)?;
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        // One error for the file, not one per line of a pretty-printed array.
        return Err(crate::Error::UnknownFormat {
            path: path.to_path_buf(),
            hint: "the file holds a JSON array, not JSON lines (one record per line): name it .json, or write one \
                   record per line"
                .into(),
        });
    }
    let stem = stem(path);
    let db_dir = resolve_db_dir(path, opts);
    let mut names = TableNames::default();
    let mut out = Dataset::default();
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let lineno = i + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let at = |id: Option<&str>| match id {
            Some(id) => format!("{}:{lineno} (question {stem}:{id})", path.display()),
            None => format!("{}:{lineno}", path.display()),
        };
        let text = match std::str::from_utf8(line) {
            Ok(t) => t,
            Err(e) => {
                out.errors.push(LoadError {
                    location: at(None),
                    message: format!(
                        "not valid UTF-8 at byte {} of the line; convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
                        e.valid_up_to()
                    ),
                });
                continue;
            }
        };
        let mut rec: J = match serde_json::from_str(text) {
            Ok(r) => r,
            Err(e) => {
                out.errors.push(LoadError { location: at(None), message: format!("invalid JSON: {e}") });
                continue;
            }
        };
        repair_json(&mut rec);
        let id = id_of(&rec);
        let origin = Origin { path: path.to_path_buf(), line: Some(lineno) };
        match jsonl_question(&rec, &stem, origin, db_dir.as_deref(), &mut names) {
            Ok(q) => out.questions.push(q),
            Err(message) => out.errors.push(LoadError { location: at(id.as_deref()), message }),
        }
    }
    Ok(out)
}

fn jsonl_question(
    rec: &J,
    stem: &str,
    origin: Origin,
    db_dir: Option<&Path>,
    names: &mut TableNames,
) -> std::result::Result<Question, String> {
    let id = id_of(rec).ok_or("field \"id_\" is missing")?;
    let text = str_field(rec, "Question")?.to_string();
    let table_names = strings(rec.get("table_names"));
    if table_names.is_empty() {
        return Err("field \"table_names\" is missing or empty".into());
    }
    let db_id = match rec.get("spider_db_id") {
        Some(J::String(s)) => s.clone(),
        _ => {
            let why = rec.get("reconstruction").and_then(J::as_str).unwrap_or("no spider_db_id");
            return Err(format!(
                "no database holds its tables {table_names:?} (spider_db_id is null; reconstruction: {why})"
            ));
        }
    };
    let db_dir = db_dir.ok_or_else(|| {
        format!("no Spider database folder found for spider_db_id {db_id:?}: pass --db-dir pointing at Spider's database/ folder")
    })?;
    let db_path = db_dir.join(&db_id).join(format!("{db_id}.sqlite"));
    let renamed = rec.get("reconstruction").and_then(J::as_str) == Some("columns_renamed_positionally");
    let columns: Vec<Vec<String>> = rec
        .get("table_columns")
        .and_then(J::as_array)
        .map(|a| a.iter().map(|c| strings(Some(c))).collect())
        .unwrap_or_default();
    let mut tables = Vec::with_capacity(table_names.len());
    for (i, name) in table_names.iter().enumerate() {
        let source = names
            .resolve(&db_path, name)?
            .ok_or_else(|| format!("table {name:?} is not in {} (spider_db_id {db_id:?})", db_path.display()))?;
        let rename = if renamed { columns.get(i).cloned() } else { None };
        tables.push(TableRef { name: name.clone(), source, rename });
    }
    let mut gold = Vec::new();
    if let Some(a) = rec.get("answer_exec").and_then(Answer::from_json) {
        gold.push(GoldAnswer { provenance: Provenance::Executed, answer: a });
    }
    if let Some(a) = rec.get("answer_original").and_then(Answer::from_json) {
        gold.push(GoldAnswer { provenance: Provenance::Published, answer: a });
    }
    Ok(Question {
        id: QuestionId(format!("{stem}:{id}")),
        text,
        tables: TableSource::Sqlite { path: db_path, tables, isolate: true, declared_types: false },
        gold_sql: rec.get("SQL").and_then(J::as_str).map(str::to_string),
        gold,
        split: rec.get("cute_finetune_split").and_then(J::as_str).and_then(Split::parse),
        key_hints: key_hints(rec),
        origin,
    })
}

/// Loads MMQA records with embedded rows (`tables: [{table_columns,
/// table_content}]`): MMQA's published format and the rebuilt
/// `*_with_rows.json` files. Text is repaired for mojibake. The record's
/// `answer` is taken as published, except in rebuilt files (which carry
/// `spider_db_id`), where it is the executed result.
pub fn load_mmqa_records(path: &Path, records: Vec<J>) -> Result<Dataset> {
    let stem = stem(path);
    let mut out = Dataset::default();
    for (i, mut rec) in records.into_iter().enumerate() {
        repair_json(&mut rec);
        let origin = Origin { path: path.to_path_buf(), line: None };
        match record_question(&rec, &stem, origin) {
            Ok(q) => out.questions.push(q),
            Err(message) => {
                let id = id_of(&rec).map(|id| format!(" (question {stem}:{id})")).unwrap_or_default();
                out.errors.push(LoadError { location: format!("{} record {i}{id}", path.display()), message });
            }
        }
    }
    Ok(out)
}

fn record_question(rec: &J, stem: &str, origin: Origin) -> std::result::Result<Question, String> {
    let id = id_of(rec).ok_or("field \"id_\" is missing")?;
    let text = str_field(rec, "Question")?.to_string();
    let table_names = strings(rec.get("table_names"));
    let tables_json = rec.get("tables").and_then(J::as_array).ok_or("field \"tables\" is missing or not a list")?;
    if tables_json.len() != table_names.len() {
        return Err(format!("{} tables but {} table_names", tables_json.len(), table_names.len()));
    }
    let mut tables = Vec::with_capacity(tables_json.len());
    for (name, t) in table_names.iter().zip(tables_json) {
        let cols = strings(t.get("table_columns"));
        let rows: Vec<Vec<Value>> = t
            .get("table_content")
            .and_then(J::as_array)
            .ok_or_else(|| format!("table {name:?}: table_content is missing"))?
            .iter()
            .map(|r| r.as_array().map(|cells| cells.iter().map(Value::from_json).collect()).unwrap_or_default())
            .collect();
        if let Some((j, r)) = rows.iter().enumerate().find(|(_, r)| r.len() != cols.len()) {
            return Err(format!("table {name:?} row {j} has {} values for {} columns", r.len(), cols.len()));
        }
        tables.push(Table::from_rows(name.clone(), cols, rows));
    }
    let provenance = if rec.get("spider_db_id").is_some() { Provenance::Executed } else { Provenance::Published };
    let gold = rec.get("answer").and_then(Answer::from_json).map(|answer| GoldAnswer { provenance, answer });
    Ok(Question {
        id: QuestionId(format!("{stem}:{id}")),
        text,
        // Untyped columns, as the executed labels of the rebuilt files were made.
        tables: TableSource::Inline {
            db: Arc::new(Database { name: format!("{stem}:{id}"), tables, foreign_keys: Vec::new() }),
            declared_types: false,
        },
        gold_sql: rec.get("SQL").and_then(J::as_str).map(str::to_string),
        gold: gold.into_iter().collect(),
        split: rec.get("cute_finetune_split").and_then(J::as_str).and_then(Split::parse),
        key_hints: key_hints(rec),
        origin,
    })
}
