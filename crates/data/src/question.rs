//! Questions over table sets, with their gold SQL and gold answers.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::answer::Answer;
use crate::table::Database;

/// A question's id, unique within a loaded dataset: `<source>:<id>`, e.g.
/// `two_table:0` (MMQA), `train_spider:41` (Spider, by position).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct QuestionId(pub String);

impl fmt::Display for QuestionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which split a question belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training questions.
    Train,
    /// Validation (held-out) questions.
    Val,
    /// Test questions.
    Test,
}

impl Split {
    /// Reads `train`, `val`/`validation`/`dev` or `test`.
    pub fn parse(s: &str) -> Option<Split> {
        match s.trim().to_ascii_lowercase().as_str() {
            "train" => Some(Split::Train),
            "val" | "validation" | "dev" => Some(Split::Val),
            "test" => Some(Split::Test),
            _ => None,
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        })
    }
}

/// Where a gold answer comes from. Scores always say which one they use:
/// MMQA's published answers disagree with its own SQL in roughly 45% of the
/// records checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provenance {
    /// The answer the dataset's authors published.
    Published,
    /// The result of executing the gold SQL on the tables.
    Executed,
}

/// One gold answer with its provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldAnswer {
    /// Published or executed.
    pub provenance: Provenance,
    /// The answer itself.
    pub answer: Answer,
}

/// One table a question uses, as found in a SQLite file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRef {
    /// The name the question (and its SQL) uses.
    pub name: String,
    /// The name in the SQLite file (may differ in case).
    pub source: String,
    /// Column names to apply by position, when the dataset renamed them
    /// (MMQA's `columns_renamed_positionally`).
    pub rename: Option<Vec<String>>,
}

/// Where a question's tables live.
#[derive(Debug, Clone, PartialEq)]
pub enum TableSource {
    /// Rows embedded in the dataset (MMQA original records, CSV folders).
    Inline {
        /// The tables with their rows.
        db: Arc<Database>,
        /// Create the columns with their types (SQLite affinity applies) or
        /// without, as for the `declared_types` of [`TableSource::Sqlite`].
        declared_types: bool,
    },
    /// Tables of a SQLite file.
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// The question's tables.
        tables: Vec<TableRef>,
        /// If true, SQL sees only these tables: they are copied into a
        /// private in-memory database (MMQA). If false, SQL runs on the
        /// whole file, opened read-only (Spider).
        isolate: bool,
        /// For isolated copies: create the copied columns with their declared
        /// types (SQLite type affinity applies) or without (no affinity, so
        /// `'301' = 301` is false). MMQA's executed labels were made on
        /// untyped copies, so its loader sets this to false.
        declared_types: bool,
    },
}

impl TableSource {
    /// The names of the question's tables.
    pub fn table_names(&self) -> Vec<String> {
        match self {
            TableSource::Inline { db, .. } => db.tables.iter().map(|t| t.name.clone()).collect(),
            TableSource::Sqlite { tables, .. } => tables.iter().map(|t| t.name.clone()).collect(),
        }
    }
}

/// Where in a file an item came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The dataset file.
    pub path: PathBuf,
    /// 1-based line (JSON lines) or record index (JSON arrays, 0-based).
    pub line: Option<usize>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}", self.path.display()),
            None => write!(f, "{}", self.path.display()),
        }
    }
}

/// Key phrases a dataset gives in prose rather than as column references
/// (MMQA's `primary_keys`/`foreign_keys`, e.g. `"department id"`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyHints {
    /// Primary-key phrases.
    pub primary: Vec<String>,
    /// Foreign-key phrases.
    pub foreign: Vec<String>,
}

/// A question over a set of tables.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    /// Unique id within the dataset.
    pub id: QuestionId,
    /// The question in natural language.
    pub text: String,
    /// The tables it is asked over.
    pub tables: TableSource,
    /// The gold SQL, when the dataset has one.
    pub gold_sql: Option<String>,
    /// Gold answers stored in the dataset (executing `gold_sql` gives another).
    pub gold: Vec<GoldAnswer>,
    /// The split, when the dataset has one.
    pub split: Option<Split>,
    /// Key phrases from the dataset, used when the tables carry no keys.
    pub key_hints: KeyHints,
    /// Where the question was read from.
    pub origin: Origin,
}

impl Question {
    /// How many tables the question is asked over.
    pub fn n_tables(&self) -> usize {
        self.tables.table_names().len()
    }

    /// The stored gold answer with this provenance, if any.
    pub fn gold(&self, provenance: Provenance) -> Option<&Answer> {
        self.gold.iter().find(|g| g.provenance == provenance).map(|g| &g.answer)
    }

    /// What of the question a model may read: its text and the dataset's
    /// key phrases — never its gold SQL or answers. Prompts are built from
    /// this view only, so they cannot depend on gold.
    pub fn asked(&self) -> Asked<'_> {
        Asked { text: &self.text, key_hints: &self.key_hints }
    }

    /// The database the question's tables come from: the SQLite file's stem
    /// (Spider's and MMQA's `db_id`), or the inline database's name.
    pub fn database_id(&self) -> String {
        match &self.tables {
            TableSource::Sqlite { path, .. } => {
                path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
            }
            TableSource::Inline { db, .. } => db.name.clone(),
        }
    }
}

/// The part of a [`Question`] a model is shown (see [`Question::asked`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asked<'a> {
    /// The question in natural language.
    pub text: &'a str,
    /// Key phrases from the dataset (MMQA's `primary_keys`/`foreign_keys`).
    pub key_hints: &'a KeyHints,
}
