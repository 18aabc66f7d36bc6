//! Typed cell values and column types, as SQLite sees them.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One cell of a table or of a query result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    /// SQL NULL (JSON `null`).
    Null,
    /// A 64-bit integer.
    Integer(i64),
    /// A double-precision float.
    Real(f64),
    /// UTF-8 text.
    Text(String),
    /// Raw bytes (rare in the datasets; rendered as hex).
    Blob(Vec<u8>),
}

impl Value {
    /// The value as a number, if it is one or is text that reads as one.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Integer(i) => Some(*i as f64),
            Value::Real(x) => Some(*x),
            Value::Text(s) => s.trim().parse::<f64>().ok().filter(|x| x.is_finite()),
            Value::Null | Value::Blob(_) => None,
        }
    }

    /// Converts a JSON scalar into a value: integers stay integers, other
    /// numbers become reals, booleans become 0/1 and nested JSON becomes text.
    pub fn from_json(v: &serde_json::Value) -> Value {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Integer(i64::from(*b)),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Integer(i),
                None => Value::Real(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::Text(s.clone()),
            other => Value::Text(other.to_string()),
        }
    }

    /// Reads a CSV field: empty is NULL, then integer, then real, else text.
    pub fn from_csv_field(field: &str) -> Value {
        if field.is_empty() {
            Value::Null
        } else if let Ok(i) = field.parse::<i64>() {
            Value::Integer(i)
        } else if let Some(x) = field.parse::<f64>().ok().filter(|x| x.is_finite()) {
            Value::Real(x)
        } else {
            Value::Text(field.to_string())
        }
    }

    /// The storage class SQLite would give this value.
    pub fn column_type(&self) -> ColumnType {
        match self {
            Value::Null => ColumnType::Any,
            Value::Integer(_) => ColumnType::Integer,
            Value::Real(_) => ColumnType::Real,
            Value::Text(_) => ColumnType::Text,
            Value::Blob(_) => ColumnType::Blob,
        }
    }
}

impl fmt::Display for Value {
    /// Renders the value the way a person writes it: integers plainly, reals
    /// without a spurious `.0` only when SQLite would print one (`231794.0`
    /// prints as `231794.0`, keeping the type visible), text as is.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Integer(i) => write!(f, "{i}"),
            Value::Real(x) if x.fract() == 0.0 && x.abs() < 1e15 => write!(f, "{x:.1}"),
            Value::Real(x) => write!(f, "{x}"),
            Value::Text(s) => f.write_str(s),
            Value::Blob(b) => {
                f.write_str("x'")?;
                for byte in b {
                    write!(f, "{byte:02x}")?;
                }
                f.write_str("'")
            }
        }
    }
}

impl From<rusqlite::types::ValueRef<'_>> for Value {
    fn from(v: rusqlite::types::ValueRef<'_>) -> Self {
        use rusqlite::types::ValueRef;
        match v {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Integer(i),
            ValueRef::Real(x) => Value::Real(x),
            ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
            ValueRef::Blob(b) => Value::Blob(b.to_vec()),
        }
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Integer(i) => ValueRef::Integer(*i),
            Value::Real(x) => ValueRef::Real(*x),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

/// A column's type, following SQLite's type-affinity rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    /// INTEGER affinity.
    Integer,
    /// REAL affinity.
    Real,
    /// TEXT affinity.
    Text,
    /// BLOB affinity.
    Blob,
    /// NUMERIC affinity (e.g. declared `NUMBER`, `DECIMAL`, `DATE`).
    Numeric,
    /// No declared type.
    Any,
}

impl ColumnType {
    /// Applies SQLite's affinity rules (section 3.1 of its datatype docs)
    /// to a declared column type such as `VARCHAR(20)` or `double`.
    pub fn from_declared(decl: &str) -> ColumnType {
        let d = decl.to_ascii_uppercase();
        if d.trim().is_empty() {
            ColumnType::Any
        } else if d.contains("INT") {
            ColumnType::Integer
        } else if d.contains("CHAR") || d.contains("CLOB") || d.contains("TEXT") {
            ColumnType::Text
        } else if d.contains("BLOB") {
            ColumnType::Blob
        } else if d.contains("REAL") || d.contains("FLOA") || d.contains("DOUB") {
            ColumnType::Real
        } else {
            ColumnType::Numeric
        }
    }

    /// The narrowest type that holds every value seen (used for tables that
    /// arrive without declared types: JSON records, CSV files).
    pub fn infer<'a>(values: impl IntoIterator<Item = &'a Value>) -> ColumnType {
        let mut ty = ColumnType::Any;
        for v in values {
            ty = match (ty, v.column_type()) {
                (t, ColumnType::Any) => t,
                (ColumnType::Any, t) => t,
                (a, b) if a == b => a,
                (ColumnType::Integer, ColumnType::Real) | (ColumnType::Real, ColumnType::Integer) => ColumnType::Real,
                _ => ColumnType::Text,
            };
        }
        ty
    }

    /// The declared type written into `CREATE TABLE`.
    pub fn sql_name(self) -> &'static str {
        match self {
            ColumnType::Integer => "INTEGER",
            ColumnType::Real => "REAL",
            ColumnType::Text => "TEXT",
            ColumnType::Blob => "BLOB",
            ColumnType::Numeric => "NUMERIC",
            ColumnType::Any => "",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_follows_sqlite_rules() {
        assert_eq!(ColumnType::from_declared("varchar(20)"), ColumnType::Text);
        assert_eq!(ColumnType::from_declared("BIGINT"), ColumnType::Integer);
        assert_eq!(ColumnType::from_declared("double"), ColumnType::Real);
        assert_eq!(ColumnType::from_declared("number"), ColumnType::Numeric);
        assert_eq!(ColumnType::from_declared(""), ColumnType::Any);
        // "POINT" contains "INT": SQLite really does give it INTEGER affinity.
        assert_eq!(ColumnType::from_declared("POINT"), ColumnType::Integer);
    }

    #[test]
    fn inference_widens() {
        let vals = [Value::Integer(1), Value::Null, Value::Real(2.5)];
        assert_eq!(ColumnType::infer(&vals), ColumnType::Real);
        let vals = [Value::Integer(1), Value::Text("x".into())];
        assert_eq!(ColumnType::infer(&vals), ColumnType::Text);
    }

    #[test]
    fn display_keeps_real_visible() {
        assert_eq!(Value::Real(231794.0).to_string(), "231794.0");
        assert_eq!(Value::Real(9.96).to_string(), "9.96");
        assert_eq!(Value::Integer(-3).to_string(), "-3");
        assert_eq!(Value::Blob(vec![0xab, 1]).to_string(), "x'ab01'");
    }

    #[test]
    fn csv_fields() {
        assert_eq!(Value::from_csv_field(""), Value::Null);
        assert_eq!(Value::from_csv_field("12"), Value::Integer(12));
        assert_eq!(Value::from_csv_field("1.5"), Value::Real(1.5));
        assert_eq!(Value::from_csv_field("NaN"), Value::Text("NaN".into()));
    }
}
