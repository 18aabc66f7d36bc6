//! Spider loader: questions `{question, query, db_id}`, databases under
//! `database/<db_id>/<db_id>.sqlite`, schemas in `tables.json`.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value as J;

use super::mmqa::resolve_db_dir;
use super::{read_json_array, Dataset, LoadError, LoadOptions, TableNames};
use crate::error::Result;
use crate::question::{KeyHints, Origin, Question, QuestionId, Split, TableRef, TableSource};

/// Loads Spider questions. Each question's table set is the tables its gold
/// SQL names (as MMQA's `table_names` does); its SQL runs on the whole
/// database file, opened read-only. A question whose database file is
/// missing is a load error.
pub fn load_spider(path: &Path, records: Vec<J>, opts: &LoadOptions) -> Result<Dataset> {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("spider").to_string();
    let split = if stem.contains("train") {
        Some(Split::Train)
    } else if stem.contains("dev") {
        Some(Split::Val)
    } else if stem.contains("test") {
        Some(Split::Test)
    } else {
        None
    };
    let db_dir = resolve_db_dir(path, opts);
    let tables_json = opts.tables_json.clone().or_else(|| {
        let p = path.with_file_name("tables.json");
        p.is_file().then_some(p)
    });
    let schemas = match &tables_json {
        Some(p) => schema_tables(p)?,
        None => HashMap::new(),
    };
    let mut names = TableNames::default();
    let mut out = Dataset::default();
    for (i, rec) in records.iter().enumerate() {
        let id = QuestionId(format!("{stem}:{i}"));
        let location = format!("{} record {i} (question {id})", path.display());
        let result = (|| -> std::result::Result<Question, String> {
            let text = rec.get("question").and_then(J::as_str).ok_or("field \"question\" is missing")?;
            let sql = rec.get("query").and_then(J::as_str).ok_or("field \"query\" is missing")?;
            let db_id = rec.get("db_id").and_then(J::as_str).ok_or("field \"db_id\" is missing")?;
            let dir = db_dir
                .as_deref()
                .ok_or("no database folder found: pass --db-dir pointing at Spider's database/ folder")?;
            let db_path = dir.join(db_id).join(format!("{db_id}.sqlite"));
            let all: Vec<String> = match schemas.get(db_id) {
                Some(t) if db_path.is_file() => t.clone(),
                _ => names.of(&db_path).map_err(|e| format!("{e} (db_id {db_id:?})"))?.to_vec(),
            };
            let tables = tables_in_sql(sql, &all)
                .into_iter()
                .map(|t| TableRef { name: t.clone(), source: t, rename: None })
                .collect();
            Ok(Question {
                id: id.clone(),
                text: text.to_string(),
                tables: TableSource::Sqlite { path: db_path, tables, isolate: false, declared_types: true },
                gold_sql: Some(sql.to_string()),
                gold: Vec::new(),
                split,
                key_hints: KeyHints::default(),
                origin: Origin { path: path.to_path_buf(), line: Some(i) },
            })
        })();
        match result {
            Ok(q) => out.questions.push(q),
            Err(message) => out.errors.push(LoadError { location, message }),
        }
    }
    Ok(out)
}

/// `db_id` → original table names, from Spider's `tables.json`.
fn schema_tables(path: &Path) -> Result<HashMap<String, Vec<String>>> {
    let mut out = HashMap::new();
    for db in read_json_array(path)? {
        let Some(id) = db.get("db_id").and_then(J::as_str) else {
            continue;
        };
        let tables = db
            .get("table_names_original")
            .and_then(J::as_array)
            .map(|a| a.iter().filter_map(|t| t.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        out.insert(id.to_string(), tables);
    }
    Ok(out)
}

/// The tables of `all` that `sql` names, in schema order. Words inside
/// string literals do not count.
pub(crate) fn tables_in_sql(sql: &str, all: &[String]) -> Vec<String> {
    let mut words = std::collections::HashSet::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    for c in sql.chars().chain(std::iter::once(' ')) {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' => quote = Some(c),
            None if c.is_alphanumeric() || c == '_' => {
                word.push(c.to_ascii_lowercase());
                continue;
            }
            None => {}
        }
        if !word.is_empty() {
            words.insert(std::mem::take(&mut word));
        }
    }
    all.iter().filter(|t| words.contains(&t.to_ascii_lowercase())).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tables_outside_literals() {
        let all = vec!["head".to_string(), "management".to_string(), "department".to_string()];
        let sql = "SELECT T1.name FROM Head AS T1 JOIN management AS T2 ON T1.head_id = T2.head_id WHERE T1.born_state = 'department'";
        assert_eq!(tables_in_sql(sql, &all), vec!["head", "management"]);
    }
}
