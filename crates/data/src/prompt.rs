//! Renders a question's tables as prompt text: a schema header with keys,
//! then rows as Markdown or CSV, under a budget of tokens and/or rows.
//!
//! The default budget is whole tables up to [`DEFAULT_TABLE_TOKENS`] tokens
//! (counted with the caller's counter, normally the target model's
//! tokenizer). When the tables do not fit, the rows the question most
//! likely needs are kept: rows holding a value or word that the *question
//! text* mentions (a quoted phrase, a number, a content word) come first,
//! then rows in storage order. Kept rows are printed in storage order and
//! the text says how many were left out. Output is deterministic.
//!
//! Nothing here can read gold: [`render_tables`] takes a question's
//! [`Asked`] view (text and key phrases), not the [`Question`]
//! (crate::Question) with its gold SQL and answers.

use serde::{Deserialize, Serialize};

use crate::question::{Asked, KeyHints};
use crate::sql::{SqlFailure, TableDb};
use crate::table::{loose_name, Database};
use crate::value::Value;

/// How rows are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RowFormat {
    /// A Markdown table (the default).
    #[default]
    Markdown,
    /// CSV with a header line.
    Csv,
}

/// The default token budget of a prompt's tables (MMQA's two- and
/// three-table questions mostly fit whole in it).
pub const DEFAULT_TABLE_TOKENS: usize = 3000;

/// How much of the tables a prompt may hold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// Rows shown per table at most. Default: no limit.
    pub max_rows_per_table: Option<usize>,
    /// Tokens for the whole rendering at most (headers included), counted
    /// by the counter given to [`render_tables`]. Default
    /// [`DEFAULT_TABLE_TOKENS`].
    pub max_tokens: Option<usize>,
}

impl Default for Budget {
    fn default() -> Self {
        Budget { max_rows_per_table: None, max_tokens: Some(DEFAULT_TABLE_TOKENS) }
    }
}

/// A rough token count (one token per 4 bytes, at least one per word) for
/// budgets when no tokenizer is at hand.
pub fn approx_tokens(text: &str) -> usize {
    text.len().div_ceil(4).max(text.split_whitespace().count())
}

/// Rendered tables and what was left out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RenderedTables {
    /// The text to put in the prompt.
    pub text: String,
    /// Rows shown, over all tables.
    pub rows_shown: usize,
    /// Rows in the tables.
    pub rows_total: usize,
    /// Tokens of `text`, by the counter used.
    pub tokens: usize,
    /// False when even the schema without rows exceeds the token budget
    /// (the text is then the schema alone, over budget).
    pub fits: bool,
}

impl RenderedTables {
    /// Whether every row of every table is shown.
    pub fn is_whole(&self) -> bool {
        self.rows_shown == self.rows_total
    }
}

/// Rows held for one table while scanning.
struct Candidates {
    total: usize,
    /// `(relevance, row index, row)`.
    rows: Vec<(usize, usize, Vec<Value>)>,
}

/// Renders a question's tables (already opened as `db`) for the question
/// as asked (`question`: text and key phrases only, never gold).
///
/// Memory stays bounded by the budget: rows are streamed from SQLite and at
/// most twice the per-table row budget (or 10,000 rows when only a token
/// budget is set) are held per table.
pub fn render_tables(
    db: &TableDb,
    question: Asked<'_>,
    format: RowFormat,
    budget: &Budget,
    count_tokens: &dyn Fn(&str) -> usize,
) -> Result<RenderedTables, SqlFailure> {
    let schema = db.schema()?;
    let terms = relevance_terms(question.text);
    let keep = budget.max_rows_per_table.unwrap_or(if budget.max_tokens.is_some() { 10_000 } else { usize::MAX });
    let mut candidates = Vec::with_capacity(schema.tables.len());
    for table in &schema.tables {
        let mut c = Candidates { total: 0, rows: Vec::new() };
        db.scan(&table.name, |row| {
            let score = relevance(&row, &terms);
            c.rows.push((score, c.total, row));
            c.total += 1;
            if c.rows.len() >= keep.saturating_mul(2).max(64) {
                prune(&mut c.rows, keep);
            }
            true
        })?;
        prune(&mut c.rows, keep);
        candidates.push(c);
    }

    let headers: Vec<String> = schema.tables.iter().map(|t| table_header(&schema, t, question.key_hints)).collect();
    let column_lines: Vec<String> = schema
        .tables
        .iter()
        .map(|t| render_row(format, &t.columns.iter().map(|c| c.name.clone()).collect::<Vec<_>>()))
        .collect();
    let row_texts: Vec<Vec<String>> = candidates
        .iter()
        .map(|c| {
            c.rows
                .iter()
                .map(|(_, _, r)| render_row(format, &r.iter().map(Value::to_string).collect::<Vec<_>>()))
                .collect()
        })
        .collect();

    let assemble = |chosen: &[Vec<bool>]| -> (String, usize, usize) {
        let mut text = String::new();
        let (mut rows_shown, mut rows_total) = (0, 0);
        for (t, table) in schema.tables.iter().enumerate() {
            let c = &candidates[t];
            let mut picked: Vec<(usize, &String)> = c
                .rows
                .iter()
                .zip(&row_texts[t])
                .zip(&chosen[t])
                .filter(|(_, &on)| on)
                .map(|(((_, i, _), s), _)| (*i, s))
                .collect();
            picked.sort_by_key(|(i, _)| *i);
            text.push_str(&headers[t]);
            text.push_str(&column_lines[t]);
            if format == RowFormat::Markdown {
                text.push_str(&format!("|{}\n", "---|".repeat(table.columns.len())));
            }
            for (_, row) in &picked {
                text.push_str(row);
            }
            if picked.len() < c.total {
                text.push_str(&format!(
                    "({} of {} rows shown; {} rows left out)\n",
                    picked.len(),
                    c.total,
                    c.total - picked.len()
                ));
            }
            text.push('\n');
            rows_shown += picked.len();
            rows_total += c.total;
        }
        if !schema.foreign_keys.is_empty() {
            text.push_str("Foreign keys:\n");
            for fk in &schema.foreign_keys {
                text.push_str(&format!("- {}.{} -> {}.{}\n", fk.table, fk.column, fk.ref_table, fk.ref_column));
            }
        }
        (text.trim_end().to_string() + "\n", rows_shown, rows_total)
    };

    // Choose rows: every candidate when they fit (or there is no token
    // budget), else rows in priority order taken round-robin over the
    // tables while they fit.
    let mut chosen: Vec<Vec<bool>> = row_texts.iter().map(|r| vec![true; r.len()]).collect();
    let all_fit = budget.max_tokens.is_none_or(|max| count_tokens(&assemble(&chosen).0) <= max);
    if let (false, Some(max_tokens)) = (all_fit, budget.max_tokens) {
        chosen.iter_mut().for_each(|c| c.fill(false));
        let skeleton = count_tokens(&assemble(&chosen).0);
        let mut used = skeleton;
        let mut added: Vec<(usize, usize)> = Vec::new();
        let mut next = vec![0usize; row_texts.len()];
        let mut progress = true;
        while progress {
            progress = false;
            for (t, rows) in row_texts.iter().enumerate() {
                if let Some(text) = rows.get(next[t]) {
                    let cost = count_tokens(text);
                    if used + cost <= max_tokens {
                        used += cost;
                        chosen[t][next[t]] = true;
                        added.push((t, next[t]));
                        next[t] += 1;
                        progress = true;
                    } else {
                        next[t] = rows.len();
                    }
                }
            }
        }
        // Token counts need not add up exactly (footers change, tokenizers
        // merge across lines): drop the last rows added until the text fits.
        while let Some((t, i)) = added.last().copied() {
            if count_tokens(&assemble(&chosen).0) <= max_tokens {
                break;
            }
            chosen[t][i] = false;
            added.pop();
        }
    }

    let (text, rows_shown, rows_total) = assemble(&chosen);
    let tokens = count_tokens(&text);
    let fits = budget.max_tokens.is_none_or(|m| tokens <= m);
    Ok(RenderedTables { text, rows_shown, rows_total, tokens, fits })
}

/// Keeps the `keep` most relevant rows (ties: earlier rows first).
fn prune(rows: &mut Vec<(usize, usize, Vec<Value>)>, keep: usize) {
    rows.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    rows.truncate(keep);
}

fn table_header(schema: &Database, table: &crate::table::Table, hints: &KeyHints) -> String {
    let cols: Vec<String> = table
        .columns
        .iter()
        .map(|c| match c.ty.sql_name() {
            "" => c.name.clone(),
            ty => format!("{} ({})", c.name, ty.to_lowercase()),
        })
        .collect();
    let mut s = format!("Table: {}\nColumns: {}\n", table.name, cols.join(", "));
    if !table.primary_key.is_empty() {
        s.push_str(&format!("Primary key: {}\n", table.primary_key.join(", ")));
    } else if schema.foreign_keys.is_empty() {
        // No declared keys: name the columns the dataset's key phrases point at.
        let hinted: Vec<&str> = table
            .columns
            .iter()
            .filter(|c| hints.primary.iter().chain(&hints.foreign).any(|h| loose_name(h) == loose_name(&c.name)))
            .map(|c| c.name.as_str())
            .collect();
        if !hinted.is_empty() {
            s.push_str(&format!("Key columns: {}\n", hinted.join(", ")));
        }
    }
    s
}

fn render_row(format: RowFormat, cells: &[String]) -> String {
    match format {
        RowFormat::Markdown => {
            let cells: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|").replace(['\n', '\r'], " ")).collect();
            format!("| {} |\n", cells.join(" | "))
        }
        RowFormat::Csv => {
            let cells: Vec<String> = cells
                .iter()
                .map(|c| {
                    if c.contains([',', '"', '\n', '\r']) {
                        format!("\"{}\"", c.replace('"', "\"\""))
                    } else {
                        c.clone()
                    }
                })
                .collect();
            format!("{}\n", cells.join(","))
        }
    }
}

/// Words too common to pick rows by.
const STOPWORDS: &[&str] = &[
    "all", "and", "any", "are", "been", "but", "by", "can", "did", "does", "each", "for", "from", "give", "has",
    "have", "how", "its", "list", "many", "more", "most", "much", "not", "number", "of", "one", "only", "or", "other",
    "show", "than", "that", "the", "their", "them", "there", "these", "they", "this", "those", "total", "was", "were",
    "what", "when", "where", "which", "who", "whom", "whose", "with", "would", "find", "name", "names", "also", "into",
    "per", "over", "under", "least", "both", "either",
];

/// Values the question text mentions, lowercased: quoted phrases, numbers
/// and content words (three letters or more, not a stopword).
fn relevance_terms(text: &str) -> Vec<String> {
    let mut terms = Vec::new();
    terms.extend(quoted(text, '"'));
    terms.extend(quoted(text, '\''));
    terms.extend(numbers(text));
    terms.extend(
        text.split(|c: char| !c.is_alphanumeric())
            .filter(|w| w.chars().count() >= 3 && !w.bytes().all(|b| b.is_ascii_digit()))
            .map(str::to_lowercase)
            .filter(|w| !STOPWORDS.contains(&w.as_str())),
    );
    let mut terms: Vec<String> =
        terms.into_iter().map(|t| t.trim_matches('%').trim().to_lowercase()).filter(|t| !t.is_empty()).collect();
    terms.sort();
    terms.dedup();
    terms
}

fn quoted(s: &str, q: char) -> Vec<String> {
    s.split(q).skip(1).step_by(2).map(str::to_string).collect()
}

fn numbers(s: &str) -> Vec<String> {
    s.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map(|t| t.trim_matches('.'))
        .filter(|t| !t.is_empty() && t.bytes().any(|b| b.is_ascii_digit()))
        .map(str::to_string)
        .collect()
}

fn relevance(row: &[Value], terms: &[String]) -> usize {
    if terms.is_empty() {
        return 0;
    }
    terms
        .iter()
        .filter(|term| {
            row.iter().any(|v| match v {
                Value::Text(s) => {
                    let s = s.to_lowercase();
                    s == **term
                        || (term.len() >= 3
                            && s.match_indices(term.as_str()).any(|(at, _)| is_word_at(&s, at, term.len())))
                }
                Value::Integer(_) | Value::Real(_) => {
                    term.parse::<f64>().ok().zip(v.as_f64()).is_some_and(|(a, b)| (a - b).abs() < 1e-9)
                }
                _ => false,
            })
        })
        .count()
}

/// Whether `s[at..at + len]` is bounded by non-alphanumeric characters.
fn is_word_at(s: &str, at: usize, len: usize) -> bool {
    let before = s[..at].chars().next_back().is_none_or(|c| !c.is_alphanumeric());
    let after = s[at + len..].chars().next().is_none_or(|c| !c.is_alphanumeric());
    before && after
}
