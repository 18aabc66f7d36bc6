//! Multi-table question answering data for tabletrace.
//!
//! This crate loads questions asked over several relational tables, runs
//! SQL on those tables with SQLite, renders tables into prompt text, and
//! scores answers. It has no other tabletrace dependency.
//!
//! The main types and how they connect:
//! - [`load()`] reads a path (MMQA `.jsonl` or records `.json`, Spider
//!   questions, a folder of CSV files, a SQLite file) into a [`Dataset`]:
//!   [`Question`]s plus the [`LoadError`]s of items that failed.
//! - A [`Question`] has a [`QuestionId`], text, a [`TableSource`] (inline
//!   [`Database`] of [`Table`]s, or tables of a SQLite file), gold SQL and
//!   [`GoldAnswer`]s whose [`Provenance`] says published or executed.
//! - [`TableDb::open`] prepares a question's tables for SQL;
//!   [`TableDb::query`] returns a [`ResultSet`] or a recorded
//!   [`SqlFailure`], under [`ExecLimits`] (time and rows).
//! - [`render_tables`] writes the tables as prompt text under a [`Budget`].
//! - [`matching`] normalises answers and scores a prediction against an
//!   [`Answer`]: exact match over value sets, partial match, token F1,
//!   numeric tolerance.
//! - [`check()`] runs every gold query and compares with stored answers.
//! - [`Trace`] and [`PreferencePair`] are the records the trace factory
//!   writes and the trainer reads.
//!
//! ```
//! use std::sync::Arc;
//! use tabletrace_data::{Answer, Database, ExecLimits, TableDb, Table, TableSource, Value};
//!
//! let dept = Table::from_rows(
//!     "department",
//!     vec!["id".into(), "name".into()],
//!     vec![vec![Value::Integer(1), Value::Text("Treasury".into())]],
//! );
//! let db = Database { name: "demo".into(), tables: vec![dept], foreign_keys: vec![] };
//! let tables = TableDb::open(&TableSource::Inline { db: Arc::new(db), declared_types: true }).unwrap();
//! let rows = tables.query("SELECT name FROM department WHERE id = 1", &ExecLimits::default()).unwrap();
//! assert!(tabletrace_data::matching::exact_match("treasury", &Answer::Table(rows)));
//! ```
#![deny(missing_docs)]

mod answer;
mod check;
mod error;
mod files;
mod load;
pub mod matching;
pub mod mojibake;
mod progress;
mod prompt;
mod question;
mod records;
mod sql;
mod table;
mod value;

pub use answer::{Answer, ResultSet};
pub use check::{check, CheckIssue, CheckReport};
pub use error::{Error, Result};
pub use files::write_atomic;
pub use load::{
    load, load_csv_dir, load_mmqa_jsonl, load_mmqa_records, load_spider, load_sqlite_file, Dataset, Format, LoadError,
    LoadOptions, SourceSummary,
};
pub use progress::{Reporter, Silent};
pub use prompt::{approx_tokens, render_tables, Budget, RenderedTables, RowFormat, DEFAULT_TABLE_TOKENS};
pub use question::{
    Asked, GoldAnswer, KeyHints, Origin, Provenance, Question, QuestionId, Split, TableRef, TableSource,
};
pub use records::{ErrorType, PairMetadata, Polarity, PreferencePair, Trace};
pub use sql::{is_ordered, quote_ident, ExecLimits, Executor, FailureKind, SqlFailure, TableDb};
pub use table::{Column, Database, ForeignKey, Table};
pub use value::{ColumnType, Value};
