//! Gold answers in every form the datasets use, and query results.
//!
//! MMQA publishes answers as strings (`"Treasury, 115897"`) or pandas-style
//! dicts (`{columns, index, data}`); the rebuilt MMQA files store the
//! executed result as `{columns, n_rows, data, truncated}`; Spider stores
//! none (executing the gold SQL gives it). All become an [`Answer`].

use serde::{Deserialize, Serialize};

use crate::matching::{cell_key, split_values};
use crate::value::Value;

/// Rows returned by a query, or a gold answer in tabular form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultSet {
    /// Column names (may be empty when the source gave none).
    pub columns: Vec<String>,
    /// The rows kept (at most the row limit).
    pub rows: Vec<Vec<Value>>,
    /// How many rows the query produced; more than `rows.len()` when truncated.
    pub n_rows: usize,
    /// True when `rows` holds only the first rows of the result.
    pub truncated: bool,
}

impl ResultSet {
    /// Every cell in row order, as display strings.
    pub fn values(&self) -> Vec<String> {
        self.rows.iter().flatten().map(|v| v.to_string()).collect()
    }

    /// Whether two results hold the same rows. Cells compare by value
    /// (`231794` equals `231794.0`); rows compare in order when `ordered`
    /// (the query has `ORDER BY`), else as multisets. When either side is
    /// truncated, the row counts must agree and the kept rows of the shorter
    /// side must be found in the other.
    pub fn agrees_with(&self, other: &ResultSet, ordered: bool) -> bool {
        if self.n_rows != other.n_rows {
            return false;
        }
        let keys = |r: &ResultSet| -> Vec<Vec<String>> {
            r.rows.iter().map(|row| row.iter().map(cell_key).collect()).collect()
        };
        let (a, b) = (keys(self), keys(other));
        let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
        if !self.truncated && !other.truncated && short.len() != long.len() {
            return false;
        }
        if ordered {
            return short.iter().zip(&long).all(|(x, y)| x == y);
        }
        let mut long = long;
        long.sort();
        let mut short = short;
        short.sort();
        // Multiset inclusion of `short` in `long` (equality when same length).
        let mut j = 0;
        for row in &short {
            while j < long.len() && &long[j] < row {
                j += 1;
            }
            if j == long.len() || &long[j] != row {
                return false;
            }
            j += 1;
        }
        true
    }
}

/// A gold answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "form", rename_all = "lowercase")]
pub enum Answer {
    /// A table of values (executed results, pandas-style dicts).
    Table(ResultSet),
    /// Free text, usually a comma-separated list of values.
    Text {
        /// The text as published.
        text: String,
    },
}

impl Answer {
    /// Parses any stored answer form:
    /// - a string: `"Treasury, 115897"`;
    /// - a number: `3`;
    /// - `{columns, data, n_rows?, truncated?}` (executed results);
    /// - `{columns, index, data}` (pandas `to_dict(orient="split")`);
    /// - a list of rows, or a list of values.
    ///
    /// Returns `None` for `null` and for shapes that are none of these.
    pub fn from_json(v: &serde_json::Value) -> Option<Answer> {
        use serde_json::Value as J;
        match v {
            J::Null => None,
            J::String(s) => Some(Answer::Text { text: s.clone() }),
            J::Number(_) | J::Bool(_) => Some(Answer::Text { text: Value::from_json(v).to_string() }),
            J::Object(map) => {
                let data = map.get("data")?.as_array()?;
                let rows: Vec<Vec<Value>> = data.iter().map(json_row).collect();
                let columns = map
                    .get("columns")
                    .and_then(J::as_array)
                    .map(|cs| cs.iter().map(|c| Value::from_json(c).to_string()).collect())
                    .unwrap_or_default();
                let n_rows = map.get("n_rows").and_then(J::as_u64).map_or(rows.len(), |n| n as usize);
                let truncated = map.get("truncated").and_then(J::as_bool).unwrap_or(n_rows > rows.len());
                Some(Answer::Table(ResultSet { columns, n_rows, truncated, rows }))
            }
            J::Array(items) => {
                let rows: Vec<Vec<Value>> = items.iter().map(json_row).collect();
                Some(Answer::Table(ResultSet { columns: Vec::new(), n_rows: rows.len(), truncated: false, rows }))
            }
        }
    }

    /// The answer's values, flattened: cells of a table in row order, or the
    /// comma/semicolon/newline-separated items of a text (thousands
    /// separators such as `115,897` are not split).
    pub fn values(&self) -> Vec<String> {
        match self {
            Answer::Table(rs) => rs.values(),
            Answer::Text { text } => split_values(text),
        }
    }

    /// The answer written as one line, the way a trace's final answer
    /// line states it.
    pub fn to_line(&self) -> String {
        match self {
            Answer::Text { text } => text.clone(),
            Answer::Table(rs) => rs
                .rows
                .iter()
                .map(|row| row.iter().map(Value::to_string).collect::<Vec<_>>().join(", "))
                .collect::<Vec<_>>()
                .join("; "),
        }
    }
}

fn json_row(row: &serde_json::Value) -> Vec<Value> {
    match row {
        serde_json::Value::Array(cells) => cells.iter().map(Value::from_json).collect(),
        scalar => vec![Value::from_json(scalar)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn table(rows: Vec<Vec<Value>>) -> ResultSet {
        ResultSet { columns: vec![], n_rows: rows.len(), truncated: false, rows }
    }

    #[test]
    fn parses_every_gold_form() {
        // MMQA published string (id 0).
        let a = Answer::from_json(&json!("Treasury, 115897")).unwrap();
        assert_eq!(a.values(), vec!["Treasury", "115897"]);
        // Executed result from the rebuilt MMQA files.
        let a = Answer::from_json(&json!({"columns": ["Name", "SUM(d.Num_Employees)"], "n_rows": 1,
            "data": [["Treasury", 231794.0]], "truncated": false}))
        .unwrap();
        assert_eq!(a.values(), vec!["Treasury", "231794.0"]);
        // Pandas split dict from the original MMQA records (id 19).
        let a = Answer::from_json(&json!({"columns": ["Investor_details"], "index": [0, 1],
            "data": [["k"], ["w"]]}))
        .unwrap();
        assert_eq!(a.values(), vec!["k", "w"]);
        // Truncated executed answers keep the full row count.
        let Answer::Table(rs) =
            Answer::from_json(&json!({"columns": ["x"], "n_rows": 80, "data": [[1]], "truncated": true})).unwrap()
        else {
            panic!("expected a table")
        };
        assert!(rs.truncated);
        assert_eq!(rs.n_rows, 80);
        assert!(Answer::from_json(&json!(null)).is_none());
        assert_eq!(Answer::from_json(&json!(3.0)).unwrap().values(), vec!["3.0"]);
    }

    #[test]
    fn agreement_ignores_int_vs_real_and_row_order() {
        let a = table(vec![vec![Value::Text("Treasury".into()), Value::Integer(231794)]]);
        let b = table(vec![vec![Value::Text("Treasury".into()), Value::Real(231794.0)]]);
        assert!(a.agrees_with(&b, true));
        let x = table(vec![vec![Value::Integer(1)], vec![Value::Integer(2)]]);
        let y = table(vec![vec![Value::Integer(2)], vec![Value::Integer(1)]]);
        assert!(x.agrees_with(&y, false));
        assert!(!x.agrees_with(&y, true));
        let z = table(vec![vec![Value::Integer(2)], vec![Value::Integer(2)]]);
        assert!(!x.agrees_with(&z, false), "multisets, not sets");
    }

    #[test]
    fn agreement_with_truncated_side() {
        let full = table((0..80).map(|i| vec![Value::Integer(i)]).collect());
        let stored = ResultSet {
            columns: vec![],
            rows: (0..50).map(|i| vec![Value::Integer(79 - i)]).collect(),
            n_rows: 80,
            truncated: true,
        };
        assert!(full.agrees_with(&stored, false));
        assert!(!full.agrees_with(&stored, true));
        let wrong_count = ResultSet { n_rows: 81, ..stored };
        assert!(!full.agrees_with(&wrong_count, false));
    }
}
