//! SQL execution on SQLite with a time limit and a row limit.
//!
//! A question's tables become a [`TableDb`]: a private in-memory database
//! holding copies of just those tables (MMQA, inline rows), or a Spider
//! file opened read-only. Queries return a [`ResultSet`] or a recorded
//! [`SqlFailure`]; nothing here panics on bad SQL.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};

use crate::answer::ResultSet;
use crate::question::{TableRef, TableSource};
use crate::table::{Column, Database, ForeignKey, Table};
use crate::value::{ColumnType, Value};

/// Limits on one query.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ExecLimits {
    /// Wall-clock limit; the query is interrupted after it. Default 10 s.
    pub timeout: Duration,
    /// Rows kept in the result; further rows are counted, not kept. Default 10,000.
    pub max_rows: usize,
}

impl Default for ExecLimits {
    fn default() -> Self {
        ExecLimits { timeout: Duration::from_secs(10), max_rows: 10_000 }
    }
}

/// Why a query gave no result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The tables could not be prepared (file missing, table absent).
    Setup,
    /// SQLite rejected or failed the query.
    Error,
    /// The query ran past the time limit.
    Timeout,
}

/// A recorded failure: the kind and SQLite's message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SqlFailure {
    /// Setup, error or time-out.
    pub kind: FailureKind,
    /// What went wrong, with SQLite's own words.
    pub message: String,
}

impl SqlFailure {
    fn setup(message: impl Into<String>) -> Self {
        SqlFailure { kind: FailureKind::Setup, message: message.into() }
    }
}

impl std::fmt::Display for SqlFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

/// Quotes an identifier for SQLite (`"a""b"`).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A question's tables, ready to query.
pub struct TableDb {
    conn: Connection,
    label: PathBuf,
    tables: Vec<String>,
    /// Keys and types known when the tables were copied (SQLite keeps no
    /// constraints in the copies, so they are remembered here).
    known_schema: Option<Database>,
}

impl std::fmt::Debug for TableDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableDb").field("label", &self.label).field("tables", &self.tables).finish()
    }
}

impl TableDb {
    /// Prepares a question's tables: copies them into a private in-memory
    /// database, or opens the SQLite file read-only when the source is not
    /// isolated.
    pub fn open(source: &TableSource) -> Result<TableDb, SqlFailure> {
        match source {
            TableSource::Inline { db, declared_types } => Self::from_database(db, *declared_types),
            TableSource::Sqlite { path, tables, isolate: true, declared_types } => {
                Self::copy_tables(path, tables, *declared_types)
            }
            TableSource::Sqlite { path, tables, isolate: false, .. } => {
                let conn = open_read_only(path)?;
                Ok(TableDb {
                    conn,
                    label: path.clone(),
                    tables: tables.iter().map(|t| t.name.clone()).collect(),
                    known_schema: None,
                })
            }
        }
    }

    fn memory() -> Result<Connection, SqlFailure> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        Connection::open_in_memory_with_flags(flags).map_err(|e| SqlFailure::setup(format!("in-memory database: {e}")))
    }

    /// Loads inline tables into a private in-memory database, with or
    /// without declared column types (see [`TableSource::Sqlite`]).
    pub fn from_database(db: &Database, declared_types: bool) -> Result<TableDb, SqlFailure> {
        let mut conn = Self::memory()?;
        let tx = conn.transaction().map_err(|e| SqlFailure::setup(e.to_string()))?;
        for table in &db.tables {
            let cols: Vec<String> = table
                .columns
                .iter()
                .map(|c| format!("{} {}", quote_ident(&c.name), if declared_types { c.ty.sql_name() } else { "" }))
                .collect();
            let create = format!("CREATE TABLE {} ({})", quote_ident(&table.name), cols.join(", "));
            tx.execute(&create, []).map_err(|e| SqlFailure::setup(format!("table {:?}: {e}", table.name)))?;
            if table.columns.is_empty() {
                continue;
            }
            let marks = vec!["?"; table.columns.len()].join(", ");
            let mut insert = tx
                .prepare(&format!("INSERT INTO {} VALUES ({marks})", quote_ident(&table.name)))
                .map_err(|e| SqlFailure::setup(format!("table {:?}: {e}", table.name)))?;
            for (i, row) in table.rows.iter().enumerate() {
                insert
                    .execute(rusqlite::params_from_iter(row.iter()))
                    .map_err(|e| SqlFailure::setup(format!("table {:?} row {i}: {e}", table.name)))?;
            }
        }
        tx.commit().map_err(|e| SqlFailure::setup(e.to_string()))?;
        let schema = Database {
            name: db.name.clone(),
            tables: db.tables.iter().map(|t| Table { rows: Vec::new(), ..t.clone() }).collect(),
            foreign_keys: db.foreign_keys.clone(),
        };
        Ok(TableDb {
            conn,
            label: PathBuf::from(format!(":memory:{}", db.name)),
            tables: db.tables.iter().map(|t| t.name.clone()).collect(),
            known_schema: Some(schema),
        })
    }

    /// Copies the named tables of a SQLite file into a private in-memory
    /// database, applying positional renames. The rows never pass through
    /// Rust, so large tables cost SQLite's memory only.
    fn copy_tables(path: &Path, tables: &[TableRef], declared_types: bool) -> Result<TableDb, SqlFailure> {
        if !path.is_file() {
            return Err(SqlFailure::setup(format!("database file not found: {}", path.display())));
        }
        let conn = Self::memory()?;
        let mut schema = Database { name: path.display().to_string(), ..Database::default() };
        let mut source_columns: Vec<Vec<String>> = Vec::new();
        let uri = format!("file:{}?mode=ro", uri_escape(path));
        conn.execute("ATTACH DATABASE ?1 AS src", [&uri])
            .map_err(|e| SqlFailure::setup(format!("{}: {e}", path.display())))?;
        for t in tables {
            let cols = table_info(&conn, "src", &t.source)
                .map_err(|e| SqlFailure::setup(format!("{}: table {:?}: {e}", path.display(), t.source)))?;
            if cols.is_empty() {
                return Err(SqlFailure::setup(format!("{}: no table named {:?}", path.display(), t.source)));
            }
            let names: Vec<String> = match &t.rename {
                Some(r) if r.len() == cols.len() => r.clone(),
                Some(r) => {
                    return Err(SqlFailure::setup(format!(
                        "{}: table {:?} has {} columns but the rename lists {}",
                        path.display(),
                        t.source,
                        cols.len(),
                        r.len()
                    )))
                }
                None => cols.iter().map(|c| c.0.clone()).collect(),
            };
            let defs: Vec<String> = names
                .iter()
                .zip(&cols)
                .map(|(n, c)| if declared_types { format!("{} {}", quote_ident(n), c.1) } else { quote_ident(n) })
                .collect();
            let sql = format!(
                "CREATE TABLE main.{name} ({defs}); INSERT INTO main.{name} SELECT * FROM src.{src};",
                name = quote_ident(&t.name),
                defs = defs.join(", "),
                src = quote_ident(&t.source)
            );
            conn.execute_batch(&sql)
                .map_err(|e| SqlFailure::setup(format!("{}: table {:?}: {e}", path.display(), t.source)))?;
            let mut pk: Vec<(i64, String)> =
                cols.iter().zip(&names).filter(|(c, _)| c.2 > 0).map(|(c, n)| (c.2, n.clone())).collect();
            pk.sort();
            schema.tables.push(Table {
                name: t.name.clone(),
                columns: names
                    .iter()
                    .zip(&cols)
                    .map(|(n, c)| Column { name: n.clone(), ty: ColumnType::from_declared(&c.1) })
                    .collect(),
                primary_key: pk.into_iter().map(|p| p.1).collect(),
                rows: Vec::new(),
            });
            source_columns.push(cols.into_iter().map(|c| c.0).collect());
        }
        // Foreign keys between the copied tables, with renamed columns.
        let renamed = |ti: usize, col: &str| -> Option<String> {
            let i = source_columns[ti].iter().position(|c| c.eq_ignore_ascii_case(col))?;
            Some(schema.tables[ti].columns[i].name.clone())
        };
        let mut fks = Vec::new();
        for (ti, t) in tables.iter().enumerate() {
            for (ref_source, from, to) in foreign_key_list(&conn, "src", &t.source).unwrap_or_default() {
                let Some(ri) = tables.iter().position(|r| r.source.eq_ignore_ascii_case(&ref_source)) else {
                    continue;
                };
                let to = to.or_else(|| schema.tables[ri].primary_key.first().cloned());
                if let (Some(column), Some(ref_column)) = (renamed(ti, &from), to.and_then(|c| renamed(ri, &c))) {
                    fks.push(ForeignKey {
                        table: t.name.clone(),
                        column,
                        ref_table: tables[ri].name.clone(),
                        ref_column,
                    });
                }
            }
        }
        schema.foreign_keys = fks;
        conn.execute("DETACH DATABASE src", []).map_err(|e| SqlFailure::setup(e.to_string()))?;
        Ok(TableDb {
            conn,
            label: path.to_path_buf(),
            tables: tables.iter().map(|t| t.name.clone()).collect(),
            known_schema: Some(schema),
        })
    }

    /// Runs one query under the limits. Every row is counted; at most
    /// `limits.max_rows` are kept.
    pub fn query(&self, sql: &str, limits: &ExecLimits) -> Result<ResultSet, SqlFailure> {
        let deadline = Instant::now() + limits.timeout;
        self.conn.progress_handler(1_000, Some(move || Instant::now() > deadline));
        let result = self.query_inner(sql, limits);
        self.conn.progress_handler(0, None::<fn() -> bool>);
        result.map_err(|e| {
            let timed_out = matches!(&e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::OperationInterrupted);
            if timed_out {
                SqlFailure { kind: FailureKind::Timeout, message: format!("interrupted after {:?}", limits.timeout) }
            } else {
                SqlFailure { kind: FailureKind::Error, message: e.to_string() }
            }
        })
    }

    fn query_inner(&self, sql: &str, limits: &ExecLimits) -> rusqlite::Result<ResultSet> {
        let mut stmt = self.conn.prepare(sql)?;
        let columns: Vec<String> = stmt.column_names().into_iter().map(str::to_string).collect();
        let width = columns.len();
        let mut rows = Vec::new();
        let mut n_rows = 0usize;
        let mut cursor = stmt.query([])?;
        while let Some(row) = cursor.next()? {
            if rows.len() < limits.max_rows {
                rows.push((0..width).map(|i| row.get_ref(i).map(Value::from)).collect::<rusqlite::Result<Vec<_>>>()?);
            }
            n_rows += 1;
        }
        Ok(ResultSet { truncated: n_rows > rows.len(), columns, rows, n_rows })
    }

    /// The question's tables with their columns, primary keys and foreign
    /// keys (between these tables), without rows.
    pub fn schema(&self) -> Result<Database, SqlFailure> {
        if let Some(db) = &self.known_schema {
            return Ok(db.clone());
        }
        let mut db = Database { name: self.label.display().to_string(), ..Database::default() };
        for name in &self.tables {
            let cols =
                table_info(&self.conn, "main", name).map_err(|e| SqlFailure::setup(format!("table {name:?}: {e}")))?;
            let mut pk: Vec<(i64, String)> = cols.iter().filter(|c| c.2 > 0).map(|c| (c.2, c.0.clone())).collect();
            pk.sort();
            db.tables.push(Table {
                name: name.clone(),
                columns: cols
                    .iter()
                    .map(|c| Column { name: c.0.clone(), ty: ColumnType::from_declared(&c.1) })
                    .collect(),
                primary_key: pk.into_iter().map(|p| p.1).collect(),
                rows: Vec::new(),
            });
        }
        for name in &self.tables {
            let fks = foreign_key_list(&self.conn, "main", name).map_err(|e| SqlFailure::setup(e.to_string()))?;
            for (ref_table, column, ref_column) in fks {
                let Some(target) = db.table(&ref_table) else {
                    continue;
                };
                let ref_column = ref_column.or_else(|| target.primary_key.first().cloned()).unwrap_or_default();
                db.foreign_keys.push(ForeignKey {
                    table: name.clone(),
                    column,
                    ref_table: target.name.clone(),
                    ref_column,
                });
            }
        }
        Ok(db)
    }

    /// Streams a table's rows in storage order to `visit`, stopping early
    /// when it returns false. Memory stays bounded whatever the table's size.
    pub fn scan(&self, table: &str, mut visit: impl FnMut(Vec<Value>) -> bool) -> Result<(), SqlFailure> {
        let sql = format!("SELECT * FROM main.{}", quote_ident(table));
        let err =
            |e: rusqlite::Error| SqlFailure { kind: FailureKind::Error, message: format!("table {table:?}: {e}") };
        let mut stmt = self.conn.prepare(&sql).map_err(err)?;
        let width = stmt.column_count();
        let mut rows = stmt.query([]).map_err(err)?;
        while let Some(row) = rows.next().map_err(err)? {
            let values = (0..width)
                .map(|i| row.get_ref(i).map(Value::from))
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(err)?;
            if !visit(values) {
                break;
            }
        }
        Ok(())
    }

    /// Row count of one table.
    pub fn count_rows(&self, table: &str) -> Result<usize, SqlFailure> {
        let sql = format!("SELECT COUNT(*) FROM main.{}", quote_ident(table));
        self.conn
            .query_row(&sql, [], |r| r.get::<_, i64>(0))
            .map(|n| n as usize)
            .map_err(|e| SqlFailure { kind: FailureKind::Error, message: format!("table {table:?}: {e}") })
    }
}

/// `(name, declared type, pk position)` for each column of a table.
fn table_info(conn: &Connection, schema: &str, table: &str) -> rusqlite::Result<Vec<(String, String, i64)>> {
    let sql = format!("PRAGMA {schema}.table_info({})", quote_ident(table));
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(5)?)))?;
    rows.collect()
}

/// `(referenced table, column, referenced column)` for each foreign key of a table.
fn foreign_key_list(
    conn: &Connection,
    schema: &str,
    table: &str,
) -> rusqlite::Result<Vec<(String, String, Option<String>)>> {
    let sql = format!("PRAGMA {schema}.foreign_key_list({})", quote_ident(table));
    let mut stmt = conn.prepare(&sql)?;
    let rows =
        stmt.query_map([], |r| Ok((r.get::<_, String>(2)?, r.get::<_, String>(3)?, r.get::<_, Option<String>>(4)?)))?;
    rows.collect()
}

fn open_read_only(path: &Path) -> Result<Connection, SqlFailure> {
    if !path.is_file() {
        return Err(SqlFailure::setup(format!("database file not found: {}", path.display())));
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
    let uri = format!("file:{}?mode=ro", uri_escape(path));
    Connection::open_with_flags(uri, flags).map_err(|e| SqlFailure::setup(format!("{}: {e}", path.display())))
}

fn uri_escape(path: &Path) -> String {
    let s = path.to_string_lossy();
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            '?' => out.push_str("%3f"),
            '#' => out.push_str("%23"),
            c => out.push(c),
        }
    }
    out
}

/// Whether a query's result order is meaningful (it has `ORDER BY`).
pub fn is_ordered(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    let words: Vec<&str> = lower.split_whitespace().collect();
    words.windows(2).any(|w| w == ["order", "by"])
}

/// Runs SQL for many questions, keeping one read-only connection per
/// database file for sources that query the file in place (Spider), and
/// building a private database for isolated ones.
#[derive(Debug, Default)]
pub struct Executor {
    limits: ExecLimits,
    files: HashMap<PathBuf, TableDb>,
}

impl Executor {
    /// An executor with these limits.
    pub fn new(limits: ExecLimits) -> Self {
        Executor { limits, files: HashMap::new() }
    }

    /// The limits in force.
    pub fn limits(&self) -> &ExecLimits {
        &self.limits
    }

    /// Runs `sql` on a question's tables.
    pub fn run(&mut self, source: &TableSource, sql: &str) -> Result<ResultSet, SqlFailure> {
        match source {
            TableSource::Sqlite { path, isolate: false, .. } => {
                if !self.files.contains_key(path) {
                    let db = TableDb::open(source)?;
                    self.files.insert(path.clone(), db);
                }
                self.files[path].query(sql, &self.limits)
            }
            _ => TableDb::open(source)?.query(sql, &self.limits),
        }
    }
}
