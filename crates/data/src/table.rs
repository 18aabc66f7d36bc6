//! Tables, keys and databases held in memory.

use serde::{Deserialize, Serialize};

use crate::value::{ColumnType, Value};

/// A named, typed column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Column {
    /// The column's name as the SQL uses it.
    pub name: String,
    /// Its type (declared, or inferred from the values).
    pub ty: ColumnType,
}

/// A foreign key: `table.column` references `ref_table.ref_column`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForeignKey {
    /// The referencing table.
    pub table: String,
    /// The referencing column.
    pub column: String,
    /// The referenced table.
    pub ref_table: String,
    /// The referenced column.
    pub ref_column: String,
}

/// A table: its schema and, where the dataset embeds them, its rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Table {
    /// The table's name as the SQL uses it.
    pub name: String,
    /// The columns, in order.
    pub columns: Vec<Column>,
    /// The columns of the primary key (empty when none is known).
    pub primary_key: Vec<String>,
    /// The rows; each has one value per column.
    pub rows: Vec<Vec<Value>>,
}

impl Table {
    /// Builds a table from column names and rows, inferring column types
    /// from the values. Short rows are padded with NULL, long rows cut, so
    /// every row has one value per column.
    pub fn from_rows(name: impl Into<String>, names: Vec<String>, mut rows: Vec<Vec<Value>>) -> Table {
        let width = names.len();
        for row in &mut rows {
            row.resize(width, Value::Null);
        }
        let columns = names
            .into_iter()
            .enumerate()
            .map(|(i, name)| Column { name, ty: ColumnType::infer(rows.iter().map(|r| &r[i])) })
            .collect();
        Table { name: name.into(), columns, primary_key: Vec::new(), rows }
    }

    /// The index of a column, compared case-insensitively as SQLite does.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name.eq_ignore_ascii_case(name))
    }
}

/// A set of tables with their keys: a whole database, or the tables one
/// question is asked over.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Database {
    /// A name for messages (the db id, the file stem).
    pub name: String,
    /// The tables, in a stable order.
    pub tables: Vec<Table>,
    /// The foreign keys between them.
    pub foreign_keys: Vec<ForeignKey>,
}

impl Database {
    /// The table with this name, compared case-insensitively.
    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.iter().find(|t| t.name.eq_ignore_ascii_case(name))
    }

    /// Total rows over all tables.
    pub fn row_count(&self) -> usize {
        self.tables.iter().map(|t| t.rows.len()).sum()
    }
}

/// Matches a loose key phrase from MMQA (`"department id"`) to a column
/// name (`Department_ID`): lowercase, with `_`, `-` and spaces removed.
pub(crate) fn loose_name(s: &str) -> String {
    s.chars().filter(|c| c.is_alphanumeric()).flat_map(char::to_lowercase).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_rows_pads_and_infers() {
        let t = Table::from_rows(
            "t",
            vec!["a".into(), "b".into()],
            vec![vec![Value::Integer(1)], vec![Value::Integer(2), Value::Text("x".into())]],
        );
        assert_eq!(t.rows[0], vec![Value::Integer(1), Value::Null]);
        assert_eq!(t.columns[0].ty, ColumnType::Integer);
        assert_eq!(t.columns[1].ty, ColumnType::Text);
        assert_eq!(t.column_index("A"), Some(0));
    }

    #[test]
    fn loose_names_match_mmqa_phrases() {
        assert_eq!(loose_name("department id"), loose_name("Department_ID"));
        assert_ne!(loose_name("head id"), loose_name("department_ID"));
    }
}
