//! Dataset loaders: MMQA (JSON lines and original records), Spider, a folder
//! of CSV files, and any SQLite file, found by [`load`] from a path.

mod files;
mod mmqa;
mod spider;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::question::{Question, TableSource};

pub use files::{load_csv_dir, load_sqlite_file};
pub use mmqa::{load_mmqa_jsonl, load_mmqa_records};
pub use spider::load_spider;

/// Where to find what a dataset file refers to.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Spider's `database/` folder (`<db_id>/<db_id>.sqlite` inside). When
    /// unset: `database/` beside the file, then `../spider/database`.
    pub db_dir: Option<PathBuf>,
    /// Spider's `tables.json`. When unset: beside the questions file, if there.
    pub tables_json: Option<PathBuf>,
}

/// A question (or line, or record) that could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoadError {
    /// `file:line` or the question id.
    pub location: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// The dataset formats this crate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// MMQA as JSON lines with Spider database ids (`mmqa_two_table.jsonl`).
    MmqaJsonl,
    /// MMQA's record format with rows embedded (`tables: [{table_columns, table_content}]`).
    MmqaRecords,
    /// Spider questions (`{question, query, db_id}`) with `database/`.
    Spider,
    /// A folder of CSV files (+ optional `keys.json`, `questions.jsonl`).
    CsvDir,
    /// A SQLite database file.
    Sqlite,
}

/// One file (or folder) a dataset was read from.
#[derive(Debug, Clone, Serialize)]
pub struct SourceSummary {
    /// The file or folder.
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
    /// Questions loaded from it.
    pub questions: usize,
    /// Items that failed to load.
    pub errors: usize,
}

/// Questions loaded from one or more files, with what failed to load.
#[derive(Debug, Default)]
pub struct Dataset {
    /// The questions, in file order.
    pub questions: Vec<Question>,
    /// Items that could not be loaded, each with where and why.
    pub errors: Vec<LoadError>,
    /// The files read.
    pub sources: Vec<SourceSummary>,
    /// Databases that came without questions (a SQLite file, CSV tables).
    pub databases: Vec<(String, TableSource)>,
}

impl Dataset {
    /// Items seen: questions loaded plus items that failed.
    pub fn items(&self) -> usize {
        self.questions.len() + self.errors.len()
    }

    fn absorb(&mut self, path: &Path, format: Format, part: Dataset) {
        self.sources.push(SourceSummary {
            path: path.to_path_buf(),
            format,
            questions: part.questions.len(),
            errors: part.errors.len(),
        });
        self.questions.extend(part.questions);
        self.errors.extend(part.errors);
        self.databases.extend(part.databases);
    }
}

/// Loads whatever `path` holds: an MMQA `.jsonl`, an MMQA or Spider `.json`,
/// a `.sqlite`/`.db` file, or a folder (every dataset file in it and its
/// subfolders, except a Spider `database/` folder, which is read on demand).
///
/// A file that cannot be read or parsed as a whole is an `Err`; single
/// questions that fail (a missing database, a table the file lacks) are
/// collected in [`Dataset::errors`] and loading goes on. Nothing loaded at
/// all (an empty file, or every item failed) is an `Err` too.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Dataset> {
    let out = load_any(path, opts)?;
    if out.questions.is_empty() && out.databases.is_empty() {
        let why = match out.errors.first() {
            Some(first) => format!("none of its {} items loaded; the first: {first}", out.errors.len()),
            None => "it holds no questions or tables (is the file empty?)".to_string(),
        };
        return Err(Error::NothingLoaded { path: path.to_path_buf(), why });
    }
    Ok(out)
}

fn load_any(path: &Path, opts: &LoadOptions) -> Result<Dataset> {
    let mut out = Dataset::default();
    if path.is_dir() {
        load_dir(path, opts, &mut out, 0)?;
        if out.sources.is_empty() {
            return Err(Error::UnknownFormat {
                path: path.to_path_buf(),
                hint: "no dataset files found (expected *.jsonl, *.json, *.csv or *.sqlite)".into(),
            });
        }
    } else {
        let (format, part) = load_file(path, opts)?;
        out.absorb(path, format, part);
    }
    Ok(out)
}

fn load_dir(dir: &Path, opts: &LoadOptions, out: &mut Dataset, depth: usize) -> Result<()> {
    let mut entries: Vec<PathBuf> =
        fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    let has_csv = entries.iter().any(|p| has_ext(p, &["csv"]));
    if has_csv {
        let part = load_csv_dir(dir)?;
        out.absorb(dir, Format::CsvDir, part);
    }
    for p in &entries {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if p.is_dir() {
            // A Spider `database/` folder holds one folder per database; it is
            // read through the questions that name it, not loaded as such.
            if name != "database" && depth < 3 {
                load_dir(p, opts, out, depth + 1)?;
            }
        } else if name == "tables.json" || (has_csv && (name == "questions.jsonl" || name == "keys.json")) {
            continue;
        } else if has_ext(p, &["jsonl", "json", "sqlite", "db", "sqlite3"]) {
            let (format, part) = load_file(p, opts)?;
            out.absorb(p, format, part);
        }
    }
    Ok(())
}

fn has_ext(p: &Path, exts: &[&str]) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| exts.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn load_file(path: &Path, opts: &LoadOptions) -> Result<(Format, Dataset)> {
    if has_ext(path, &["sqlite", "db", "sqlite3"]) {
        return Ok((Format::Sqlite, load_sqlite_file(path)?));
    }
    if has_ext(path, &["jsonl"]) {
        return Ok((Format::MmqaJsonl, load_mmqa_jsonl(path, opts)?));
    }
    if has_ext(path, &["json"]) {
        let records = read_json_array(path)?;
        let first = records.first().and_then(|r| r.as_object());
        return match first {
            Some(r) if r.contains_key("Question") && r.contains_key("tables") => {
                Ok((Format::MmqaRecords, load_mmqa_records(path, records)?))
            }
            Some(r) if r.contains_key("question") && r.contains_key("db_id") => {
                Ok((Format::Spider, load_spider(path, records, opts)?))
            }
            None => Ok((Format::MmqaRecords, Dataset::default())),
            Some(r) => Err(Error::UnknownFormat {
                path: path.to_path_buf(),
                hint: format!(
                    "records have keys {:?}; expected MMQA records (Question, SQL, tables) or Spider questions (question, query, db_id)",
                    r.keys().collect::<Vec<_>>()
                ),
            }),
        };
    }
    Err(Error::UnknownFormat {
        path: path.to_path_buf(),
        hint: "expected a .jsonl, .json, .sqlite or .db file, or a folder".into(),
    })
}

/// Reads a whole file, naming it on failure.
pub(crate) fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| Error::io(path, e))
}

/// Parses a JSON file whose top level is an array.
pub(crate) fn read_json_array(path: &Path) -> Result<Vec<serde_json::Value>> {
    let bytes = read_bytes(path)?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| json_error(path, &bytes, e))?;
    match value {
        serde_json::Value::Array(items) => Ok(items),
        _ => Err(Error::Json {
            path: path.to_path_buf(),
            line: None,
            message: "expected a JSON array of records".into(),
        }),
    }
}

/// A JSON error with its line, and a hint for the two common causes.
pub(crate) fn json_error(path: &Path, bytes: &[u8], e: serde_json::Error) -> Error {
    let mut message = e.to_string();
    if e.is_eof() {
        message.push_str(" (the file ends early: is it truncated?)");
    } else if std::str::from_utf8(bytes).is_err() {
        message.push_str(" (the file is not valid UTF-8; convert it, e.g. `iconv -f latin1 -t utf-8`)");
    }
    Error::Json { path: path.to_path_buf(), line: Some(e.line()), message }
}

/// Names of the tables in a SQLite file, cached per file, for resolving the
/// names a dataset uses (which may differ in case).
#[derive(Default)]
pub(crate) struct TableNames {
    cache: HashMap<PathBuf, std::result::Result<Vec<String>, String>>,
}

impl TableNames {
    pub(crate) fn of(&mut self, path: &Path) -> std::result::Result<&[String], String> {
        let entry = self.cache.entry(path.to_path_buf()).or_insert_with(|| read_table_names(path));
        entry.as_deref().map_err(Clone::clone)
    }

    /// The file's name for `name`, compared case-insensitively.
    pub(crate) fn resolve(&mut self, path: &Path, name: &str) -> std::result::Result<Option<String>, String> {
        Ok(self.of(path)?.iter().find(|t| t.eq_ignore_ascii_case(name)).cloned())
    }
}

fn read_table_names(path: &Path) -> std::result::Result<Vec<String>, String> {
    if !path.is_file() {
        return Err(format!("database file not found: {}", path.display()));
    }
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = rusqlite::Connection::open_with_flags(path, flags).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut stmt = conn
        .prepare("SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%' ORDER BY rowid")
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let names = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(names)
}
